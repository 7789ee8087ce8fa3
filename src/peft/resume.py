"""python -m src.peft.resume --help"""
from src.base.main import resume_main
from src.peft.method import METHOD

if __name__ == "__main__":
    raise SystemExit(resume_main(METHOD))
