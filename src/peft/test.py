"""python -m src.peft.test --help"""
from src.base.main import test_main
from src.peft.method import METHOD

if __name__ == "__main__":
    raise SystemExit(test_main(METHOD))
