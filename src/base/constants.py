"""Every path and default in one place.

Edit a value here, or override it for one shell with an environment variable of
the same name (``DATA_DIR=/scratch/vizwiz python -m src.ft.train``). Command-line
flags override both. Nothing machine-specific is hard-coded anywhere else.
"""
import os
import sys
from pathlib import Path


def _env(name, default, kind=None):
    """The environment variable `name` if set, cast to the type of `default` (`kind` where the default is None)."""
    raw = os.environ.get(name)
    kind = kind or type(default)
    # unset or empty: the default; but PROMPT= (a text left to the family when None) means "no prompt"
    if raw is None or (raw == "" and not (default is None and kind is str)):
        return default
    if kind is bool:
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        _bad_env(f"environment variable {name}={raw!r} is not a boolean (use 1/0, true/false)")
    try:
        return kind(raw)
    except ValueError:
        _bad_env(f"environment variable {name}={raw!r} is not a valid {kind.__name__}")


def _bad_env(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


REPO_ROOT = Path(__file__).resolve().parents[2]

# ---- paths ---------------------------------------------------------------
# VizWiz layout: DATA_DIR/annotations/{train,val,test}.json, images in DATA_DIR/{train,val,test}/
DATA_DIR = _env("DATA_DIR", str(REPO_ROOT / "data" / "vizwiz"))
RESULTS_DIR = _env("RESULTS_DIR", str(REPO_ROOT / "results"))
DEMO_DIR = _env("DEMO_DIR", str(REPO_ROOT / "data" / "demo"))
CACHE_DIR = _env("CACHE_DIR", "")                # image cache (scripts/cache_images.py); "" = <data dir>/cache

# ---- checkpoints (hub names or local directories) ------------------------
FT_CHECKPOINT = _env("FT_CHECKPOINT", "Salesforce/blip-image-captioning-base")
PEFT_CHECKPOINT = _env("PEFT_CHECKPOINT", "Salesforce/blip-image-captioning-large")

# ---- downloads (scripts/get_data.py) -------------------------------------------
# The data set's site: caption/annotations.zip and images/{train,val,test}.zip below it.
VIZWIZ_URL = _env("VIZWIZ_URL", "https://vizwiz.cs.colorado.edu/VizWiz_final")
# Comma-separated hub names that `get_data.py --checkpoints` fetches into the Hugging Face cache.
HUB_CHECKPOINTS = _env("HUB_CHECKPOINTS", f"{FT_CHECKPOINT},{PEFT_CHECKPOINT}")
# The Hugging Face cache that `get_data.py --checkpoints` fills and the runs load from (default: huggingface_hub's
# own). Set it here rather than in your shell: SGE jobs do not see your shell's variables, and scripts/job_env.sh
# exports this one. Exported here too, so that transformers (imported after this file) and child processes use it.
HF_HOME = _env("HF_HOME", str(Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "huggingface"))
os.environ["HF_HOME"] = HF_HOME

# ---- devices -------------------------------------------------------------------
ALLOW_CPU = _env("ALLOW_CPU", False)             # run on the CPU although the job asked for a GPU (--allow-cpu)

# ---- data ----------------------------------------------------------------
DROP_REJECTED = _env("DROP_REJECTED", True)      # captions flagged is_rejected by VizWiz
DROP_PRECANNED = _env("DROP_PRECANNED", True)    # "Quality issues are too severe ..." captions
MAX_CAPTION_TOKENS = _env("MAX_CAPTION_TOKENS", 40)  # longer captions are truncated (incl. [DEC] and [SEP])
NUM_WORKERS = _env("NUM_WORKERS", -1)            # DataLoader workers; -1 = from NSLOTS / CPU count
EXACT_PREPROCESSING = _env("EXACT_PREPROCESSING", False)  # decode JPEGs at full size: pixels equal BlipImageProcessor's
IMAGE_SIZE = _env("IMAGE_SIZE", None, int)     # pixels, square; None = the family's recipe (the checkpoint's own; BLIP-2: 364)

# ---- optimisation ----------------------------------------------------------
# A setting that is None here takes its value from the family's fine-tuning recipe (src/base/families/*.py, its
# authors' values where they publish them; docs/families.md has the table). Set it here, or in the environment, to
# use one value for every family; a command-line flag overrides both.
EPOCHS = _env("EPOCHS", 5)
MAX_STEPS = _env("MAX_STEPS", 0)                 # > 0 overrides EPOCHS
BATCH_SIZE = _env("BATCH_SIZE", 16)              # images per batch; each brings all its kept captions
FT_LR = _env("FT_LR", None, float)              # src.ft's rate (family recipe: BLIP-base 1e-5)
PEFT_LR = _env("PEFT_LR", None, float)          # src.peft's rate (family recipe: 2e-4)
WEIGHT_DECAY = _env("WEIGHT_DECAY", None, float)
WARMUP_RATIO = _env("WARMUP_RATIO", None, float)  # fraction of all steps spent warming up
LR_SCHEDULE = _env("LR_SCHEDULE", None, str)     # any transformers.get_scheduler name
MAX_GRAD_NORM = _env("MAX_GRAD_NORM", 1.0)
PRECISION = _env("PRECISION", "auto")            # auto | fp32 | bf16 | bf16-weights | fp16 (src/base/precision.py)
TF32 = _env("TF32", False)                       # TF32 matmuls under fp32 too (bf16/fp16 runs use them anyway)
GRAD_ACCUM = _env("GRAD_ACCUM", 1)               # micro-batches per step: same effective batch, less memory
GRAD_CHECKPOINTING = _env("GRAD_CHECKPOINTING", False)  # recompute activations in backward: less memory, slower
BLIP2_8BIT = _env("BLIP2_8BIT", False)           # BLIP-2 on a GPU: language model in 8 bits (needs bitsandbytes)
COMPILE = _env("COMPILE", False)                 # torch.compile the training forward
COMPILE_BACKEND = _env("COMPILE_BACKEND", "inductor")
SEED = _env("SEED", 42)
LABEL_SMOOTHING = _env("LABEL_SMOOTHING", None, float)  # BLIP's and GIT's authors: 0.1; BLIP-2's: 0
PROMPT = _env("PROMPT", None, str)               # BLIP: "a picture of", BLIP-2: "a photo of"; "" = none
OCR = _env("OCR", False)                         # OCR words in the caption prefix (scripts/ocr.py first; docs/ocr.md)
OCR_MIN_CONFIDENCE = _env("OCR_MIN_CONFIDENCE", 0.5)  # --ocr: text boxes read with less confidence are left out
OCR_MAX_TOKENS = _env("OCR_MAX_TOKENS", 12)      # --ocr: at most this many tokens of OCR words per image

# ---- self-critical sequence training (--objective scst) ----------------------
SCST_SAMPLES = _env("SCST_SAMPLES", 5)           # captions sampled per image
SCST_TEMPERATURE = _env("SCST_TEMPERATURE", 0.5)  # SCST samples from softmax(logits / T): see README "SCST"
# SCST runs at a constant rate, a quarter of the method's cross-entropy rate unless --lr is given (see README "SCST")
SCST_LR_FRACTION = _env("SCST_LR_FRACTION", 0.25)
SCST_BASELINE = _env("SCST_BASELINE", "mean")    # mean: of the image's other samples; greedy: its greedy caption

# ---- LoRA (src/peft) ---------------------------------------------------------
LORA_R = _env("LORA_R", 8)
LORA_ALPHA = _env("LORA_ALPHA", 32)
LORA_DROPOUT = _env("LORA_DROPOUT", 0.1)
# which parts train besides LoRA (src.peft) or at all (src.ft), e.g. "qformer,projection"; None = the family's recipe
TRAIN_MODULES = _env("TRAIN_MODULES", None, str)
LORA_TARGETS = _env("LORA_TARGETS", "")          # comma-separated module names; "" = the family's default (BLIP: query,value)

# ---- evaluation and checkpoints ----------------------------------------------
EVAL_EVERY = _env("EVAL_EVERY", 1000)            # steps; 0 = only at each epoch end
EVAL_AT_START = _env("EVAL_AT_START", True)      # validate the starting checkpoint first (step 0): best_model/ >= start
SAVE_EVERY = _env("SAVE_EVERY", 500)             # steps between full training-state saves; 0 = only at evals
SAVE_EVERY_MINUTES = _env("SAVE_EVERY_MINUTES", 15.0)  # ... and at least this often in wall time
# --time-limit: stop in time to save (see src/base/budget.py); "" = no limit. The SGE wrappers set it from h_rt.
TIME_LIMIT = _env("TIME_LIMIT", "")              # HH:MM:SS (or seconds), counted from the job's start
TIME_LIMIT_SAVE_FACTOR = _env("TIME_LIMIT_SAVE_FACTOR", 3.0)  # kept for the final save: its longest save so far x this
TIME_LIMIT_MIN_MARGIN = _env("TIME_LIMIT_MIN_MARGIN", 60.0)   # ... and never less (seconds): all it has before a save
MAX_NONFINITE_IN_A_ROW = _env("MAX_NONFINITE_IN_A_ROW", 5)  # NaN/inf losses tolerated in a row before stopping
STRICT = _env("STRICT", False)                   # stop on an unreadable image instead of skipping it
EVAL_BATCH_SIZE = _env("EVAL_BATCH_SIZE", 64)
NUM_BEAMS = _env("NUM_BEAMS", None, int)
MAX_NEW_TOKENS = _env("MAX_NEW_TOKENS", None, int)
MIN_NEW_TOKENS = _env("MIN_NEW_TOKENS", None, int)
LENGTH_PENALTY = _env("LENGTH_PENALTY", None, float)  # beam search length penalty (test --tune-decoding chooses one)
REPETITION_PENALTY = _env("REPETITION_PENALTY", 1.0)
MBR_TEMPERATURE = _env("MBR_TEMPERATURE", 0.7)   # test --mbr: candidates beyond the beams are sampled at this temperature
MBR_CHOOSE_FROM = _env("MBR_CHOOSE_FROM", "beams")  # beams: samples vote, only beams are written; all: any candidate
VAL_MAX_IMAGES = _env("VAL_MAX_IMAGES", 0)       # > 0: score only the first N val images during training
VAL_METEOR = _env("VAL_METEOR", False)           # METEOR during training validations (adds ~10 s of Java each)
