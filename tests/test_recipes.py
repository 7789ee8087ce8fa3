"""Each family's fine-tuning recipe (its authors' settings) is what a run takes where no flag, environment variable or
constant says otherwise; BLIP-2 trains its Q-Former and projection with OPT frozen, and best_model/ holds only those."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import FAST, REPO, run_module
from src.base import constants as C
from src.base.helpers import UserError
from src.base.config import resolve, training_parser
from src.base.families import Blip, Blip2, Git, apply_recipe, family_class, load_captioner, model_config
from src.ft.method import METHOD as FT
from src.peft.method import METHOD as PEFT


def _config(method, checkpoint, *flags):
    config = resolve(method, training_parser("x").parse_args(["--checkpoint", str(checkpoint), *map(str, flags)]))
    return config, apply_recipe(config, method, str(checkpoint))


DECODING = ("num_beams", "max_new_tokens", "min_new_tokens", "length_penalty")


def test_each_family_takes_its_authors_recipe_where_nothing_else_is_set(tiny_blip, tiny_git, tiny_blip2):
    blip, lines = _config(FT, tiny_blip)
    assert (blip.lr, blip.warmup_ratio, blip.prompt, blip.label_smoothing) == (1e-5, 0.0, "a picture of", 0.1)
    assert [getattr(blip, k) for k in DECODING] == [3, 16, 1, 1.0]
    assert any("caption_coco_ft.yaml" in line and "--lr 1e-05" in line for line in lines), lines
    git, lines = _config(FT, tiny_git)
    assert [getattr(git, k) for k in DECODING][0::3] == [4, 0.6]
    assert (git.prompt, git.label_smoothing, git.train_modules) == ("", 0.1, "all")
    assert any("GenerativeImage2Text" in line and "--length-penalty 0.6" in line for line in lines), lines
    blip2, _ = _config(FT, tiny_blip2)
    assert (blip2.lr, blip2.warmup_ratio, blip2.prompt, blip2.label_smoothing) == (1e-5, 0.09, "a photo of", 0.0)
    assert [getattr(blip2, k) for k in DECODING] == [5, 30, 8, 1.0]
    assert blip2.train_modules == "qformer,projection"
    lora, _ = _config(PEFT, tiny_blip2)  # LoRA is this project's: its own rate, nothing else trains
    assert (lora.lr, lora.train_modules, lora.prompt) == (2e-4, "none", "a photo of")
    # BLIP-large's recipe (LAVIS caption_coco_large_ft.yaml), from the real checkpoint's configuration
    large = model_config(str(REPO / "tests" / "fixtures" / "hub_files" / "blip-image-captioning-large"))
    assert Blip.recipe_for(large)["lr"] == (2e-6, "LAVIS lavis/projects/blip/train/caption_coco_large_ft.yaml")


def test_a_flag_beats_a_constant_or_environment_variable_which_beats_the_recipe(tiny_git, monkeypatch):
    monkeypatch.setattr(C, "NUM_BEAMS", 2)  # what an edited constant or NUM_BEAMS=2 in the environment gives
    monkeypatch.setattr(FT, "default_lr", 3e-4)  # FT_LR
    config, lines = _config(FT, tiny_git, "--length-penalty", "1.5")
    assert (config.num_beams, config.lr, config.length_penalty, config.label_smoothing) == (2, 3e-4, 1.5, 0.1)
    assert lines[-1].startswith("settings from flags, environment variables or src/base/constants.py:")
    assert "--num-beams 2" in lines[-1] and "--length-penalty 1.5" in lines[-1]
    scst, _ = _config(FT, tiny_git, "--objective", "scst")  # SCST: a quarter of the rate, constant
    assert (scst.lr, scst.lr_schedule, scst.warmup_ratio) == (3e-4 * C.SCST_LR_FRACTION, "constant", 0.0)


@pytest.fixture(scope="module")
def blip2_ft_run(tmp_path_factory, tiny_blip2, demo_data):
    out = tmp_path_factory.mktemp("runs") / "blip2-ft"
    # trained at another size than the checkpoint's 32 px and with another prompt than the recipe's "a photo of": what
    # a model trained here is later tested and trained on with (test_a_model_trained_here_keeps_its_prompt_...)
    run_module("src.ft.train", "--data-dir", demo_data, "--checkpoint", tiny_blip2, "--output-dir", out, *FAST,
               "--lr", "1e-3", "--eval-every", "4", "--max-steps", "4", "--no-eval-at-start", "--val-max-images", "8",
               "--prompt", "a picture of", "--image-size", "48")
    return out


def test_blip2_trains_its_qformer_and_projection_and_best_model_holds_only_them(blip2_ft_run, tiny_blip2, demo_data):
    config = json.loads((blip2_ft_run / "config.json").read_text())
    assert (config["train_modules"], config["prompt"], config["num_beams"]) == ("qformer,projection", "a picture of", 1)
    log = (blip2_ft_run / "train.log").read_text()
    assert "BLIP-2 defaults from LAVIS lavis/projects/blip2/train/caption_coco_ft.yaml" in log
    trained = load_file(blip2_ft_run / "state" / "trainable.safetensors")
    assert {name.split(".")[0] for name in trained} == {"qformer", "query_tokens", "language_projection", "vision_model"}
    assert {name for name in trained if name.startswith("vision_model")} <= {
        "vision_model.post_layernorm.weight", "vision_model.post_layernorm.bias"}
    best = blip2_ft_run / "best_model"
    assert not (best / "model.safetensors").exists() and not (best / "config.json").exists()
    saved = load_file(best / "trained_modules.safetensors")
    assert set(saved) == set(trained)
    base, tuned = Blip2.resize_images(load_captioner(str(tiny_blip2)), 48), load_captioner(str(best))  # see below
    base_weights, tuned_weights = base.state_dict(), tuned.state_dict()
    changed = {name for name in base_weights if not torch.equal(base_weights[name], tuned_weights[name])}
    assert changed and changed <= set(saved)  # OPT and the ViT are the base checkpoint's
    assert any(name.startswith("qformer") for name in changed)
    assert json.loads((best / "trained_modules.json").read_text())["base_model_name_or_path"] == str(tiny_blip2)
    run_module("src.ft.test", "--data-dir", demo_data, "--output-dir", blip2_ft_run, "--eval-batch-size", "32")
    assert len(json.loads((blip2_ft_run / "test_captions.json").read_text())) == 25
    resumed = run_module("src.ft.resume", "--data-dir", demo_data, "--output-dir", blip2_ft_run)  # state/ fits
    assert "resumed from" in (blip2_ft_run / "train.log").read_text(), resumed.stderr


def test_a_model_trained_here_keeps_its_prompt_and_image_size_wherever_it_goes(blip2_ft_run, demo_data, tmp_path):
    """best_model/ says how it was trained to read its input (trained_with.json): a test of it in another directory,
    or a new run from it, takes its prompt and image size (not the recipe's) and captions as its own run does."""
    best = blip2_ft_run / "best_model"
    trained = json.loads((best / "trained_with.json").read_text())
    assert (trained["prompt"], trained["image_size"], trained["ocr"]) == ("a picture of", 48, False)
    assert json.loads((best / "preprocessor_config.json").read_text())["size"] == {"height": 48, "width": 48}
    assert load_captioner(str(best)).config.vision_config.image_size == 48  # the trained parts over the 32-px base
    run_module("src.ft.test", "--data-dir", demo_data, "--output-dir", blip2_ft_run, "--split", "val")
    elsewhere = tmp_path / "elsewhere"
    run_module("src.ft.test", "--data-dir", demo_data, "--checkpoint", best, "--output-dir", elsewhere, "--split",
               "val", "--num-beams", "1")
    log = (elsewhere / "test.log").read_text()
    assert f"how {best} was trained (trained_with.json): --prompt 'a picture of', --image-size 48" in log, log
    assert (json.loads((elsewhere / "val_captions.json").read_text())
            == json.loads((blip2_ft_run / "val_captions.json").read_text()))
    second_stage, _ = _config(FT, best, "--objective", "scst")
    assert (second_stage.prompt, second_stage.image_size) == ("a picture of", 48)
    assert _config(FT, best, "--image-size", "64")[0].image_size == 64  # a flag still decides


def test_train_modules_flag_chooses_the_parts_and_the_engine_refuses_unknown_or_all_for_blip2(
        tiny_blip2, tiny_blip, demo_data, tmp_path):
    from src.ft.method import build
    from src.base.families import load_family
    config, _ = _config(FT, tiny_blip2, "--train-modules", "qformer,projection,vision")
    model = build(config, load_family(str(tiny_blip2)))
    parts = {name.split(".")[0] for name, p in model.named_parameters() if p.requires_grad}
    assert parts == {"qformer", "query_tokens", "language_projection", "vision_model"}
    assert all(p.requires_grad for name, p in model.named_parameters() if name.startswith("vision_model."))
    assert not any(p.requires_grad for name, p in model.named_parameters() if name.startswith("language_model."))
    for module, flags, words in [("src.ft.train", ["--train-modules", "all"], "src.peft"),
                                 ("src.ft.train", ["--train-modules", "qformr"], "qformer"),
                                 ("src.peft.train", ["--train-modules", "qformer"], "src.ft.train")]:
        result = run_module(module, "--data-dir", demo_data, "--checkpoint", tiny_blip2, "--output-dir",
                            tmp_path / flags[1], *FAST, "--max-steps", "1", *flags, check=False)
        message = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == 2 and len(message) == 1 and words in message[0], result.stderr
    blip_text_only, _ = _config(FT, tiny_blip, "--train-modules", "text")
    model = build(blip_text_only, load_family(str(tiny_blip)))
    assert {name.split(".")[0] for name, p in model.named_parameters() if p.requires_grad} == {"text_decoder"}


def test_the_demos_git_stage_takes_gits_recipe():
    """scripts/demo.sh gives its GIT run only the run's size and the tiny model's rate: decoding, prompt, smoothing and
    warm-up are GIT's own (through the family's recipe)."""
    script = (REPO / "scripts" / "demo.sh").read_text().replace("\\\n", " ")
    command = next(line for line in script.splitlines() if "tiny-git" in line and "src.ft.train" in line)
    recipe_flags = {"--" + key.replace("_", "-") for key in Git.recipe} | {"--warmup-ratio", "--lr-schedule"}
    given = set(command.split())
    assert not given & recipe_flags and "QUICK" not in command, command


@pytest.mark.parametrize("family", ["blip", "blip2"])
def test_a_model_resized_to_another_image_size_sees_it_as_transformers_interpolation_does(family, request):
    """--image-size: the position embeddings interpolated once equal transformers' own interpolation at every forward
    (interpolate_pos_encoding=True, the same bicubic arithmetic as LAVIS's interpolate_pos_embed); sizes that are not
    whole patches, and GIT at another size, are refused in one line."""
    checkpoint = str(request.getfixturevalue(f"tiny_{family}"))
    original, resized = load_captioner(checkpoint), load_captioner(checkpoint)
    family_class(original.config).resize_images(resized, 48)
    pixels = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        expected = original.vision_model(pixel_values=pixels, interpolate_pos_encoding=True).last_hidden_state
        got = resized.vision_model(pixel_values=pixels).last_hidden_state
    assert got.shape[1] == 1 + (48 // 8) ** 2 and torch.allclose(got, expected, atol=1e-5)
    assert resized.config.vision_config.image_size == 48 and original.config.vision_config.image_size == 32
    with pytest.raises(UserError, match="--image-size 44: must be a multiple of .* patch size, 8 pixels"):
        family_class(original.config).resize_images(original, 44)


def test_git_keeps_its_image_size(tiny_git):
    model = load_captioner(str(tiny_git))
    Git.resize_images(model, 32)  # its own: nothing to do
    with pytest.raises(UserError, match="GIT trains and captions at its checkpoint's 32 px only"):
        Git.resize_images(model, 48)


def test_blip2s_recipe_fine_tunes_vit_g_at_364_and_the_others_keep_their_checkpoints_size(tiny_blip2):
    from transformers import Blip2Config
    vit_g = Blip2Config()  # transformers' defaults are blip2-opt-2.7b's: ViT-g, 224 px, patches of 14
    assert Blip2.recipe_for(vit_g)["image_size"] == (364, "LAVIS lavis/projects/blip2/train/caption_coco_ft.yaml")
    assert Blip2.recipe_for(model_config(str(tiny_blip2)))["image_size"] == (32, "the checkpoint's own configuration")
    base = model_config(str(REPO / "tests" / "fixtures" / "hub_files" / "blip-image-captioning-base"))
    assert Blip.recipe_for(base)["image_size"][0] == 384  # LAVIS's caption_coco_ft.yaml too
