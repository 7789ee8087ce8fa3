"""python -m src.ft.train --help"""
from src.base.main import train_main
from src.ft.method import METHOD


def main(argv=None):
    return train_main(METHOD, argv)


if __name__ == "__main__":
    raise SystemExit(main())
