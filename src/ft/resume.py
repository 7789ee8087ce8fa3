"""python -m src.ft.resume --help"""
from src.base.main import resume_main
from src.ft.method import METHOD

if __name__ == "__main__":
    raise SystemExit(resume_main(METHOD))
