"""python -m src.ft.resume --help"""
from src.base.main import resume_main
from src.ft.method import METHOD


def main(argv=None):
    return resume_main(METHOD, argv)


if __name__ == "__main__":
    raise SystemExit(main())
