"""python -m src.ft.test --help"""
from src.base.main import test_main
from src.ft.method import METHOD


def main(argv=None):
    return test_main(METHOD, argv)


if __name__ == "__main__":
    raise SystemExit(main())
