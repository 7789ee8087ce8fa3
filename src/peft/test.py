"""python -m src.peft.test --help"""
from src.base.main import test_main
from src.peft.method import METHOD


def main(argv=None):
    return test_main(METHOD, argv)


if __name__ == "__main__":
    raise SystemExit(main())
