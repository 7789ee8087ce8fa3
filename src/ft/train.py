"""python -m src.ft.train --help"""
from src.base.main import train_main
from src.ft.method import METHOD

if __name__ == "__main__":
    raise SystemExit(train_main(METHOD))
