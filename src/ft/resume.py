"""python -m src.ft.resume --help"""
from src.base.main import resume_main
from src.ft.method import METHOD

if __name__ == "__main__":
    resume_main(METHOD)
