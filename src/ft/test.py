"""python -m src.ft.test --help"""
from src.base.main import test_main
from src.ft.method import METHOD

if __name__ == "__main__":
    raise SystemExit(test_main(METHOD))
