"""python -m src.peft.resume --help"""
from src.base.main import resume_main
from src.peft.method import METHOD


def main(argv=None):
    return resume_main(METHOD, argv)


if __name__ == "__main__":
    raise SystemExit(main())
