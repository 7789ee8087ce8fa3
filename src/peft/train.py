"""python -m src.peft.train --help"""
from src.base.main import train_main
from src.peft.method import METHOD


def main(argv=None):
    return train_main(METHOD, argv)


if __name__ == "__main__":
    raise SystemExit(main())
