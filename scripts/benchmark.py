"""Measure our training and captioning paths (any captioner family) against a re-creation of the original
template's loop (BLIP only).

    python scripts/benchmark.py                          # CPU: BLIP-base shapes at 224 px, random weights
    python scripts/benchmark.py --family git             # CPU: "small" GIT shapes (224 px; about a minute)
    python scripts/benchmark.py --family blip2           # CPU: "small" BLIP-2 shapes (224 px; about a minute)
    python scripts/benchmark.py --shape base --image-size 384 --json results/bench-gpu.json   # on a GPU
    python scripts/benchmark.py --skip loading,train,caption --compare-attention   # BLIP's text decoder alone:
                                                         # transformers' attention vs our fused attention
    python scripts/benchmark.py --family blip2 --json results/bench-blip2-gpu.json  # GPU: blip2-opt-2.7b shapes

Every path runs in this one process, on the same synthetic images and captions, with a model built
from a config (random weights: no download). A "caption" is one (image, caption) training pair.

Shapes (--shape; default: the family's "CPU default" on the CPU, the "GPU default" on a GPU):
  blip    tiny | base (BLIP-base: ViT-B/16, BERT-base decoder; both defaults) | large (ViT-L/16)
  git     tiny | small (CLIP ViT 6 layers of 384, 4 text layers of 384: CPU default)
               | base (git-base: CLIP ViT-B/16, 6 text layers of 768: GPU default)
               | large (git-large: CLIP ViT-L/14, 6 text layers of 1024); 224 px
  blip2   tiny | small (ViT 6 layers of 384, Q-Former 4 layers of 384, OPT 4 layers of 512: CPU default)
               | opt-2.7b (blip2-opt-2.7b: ViT-g/14, Q-Former, OPT-2.7b: GPU default); 224 px
BLIP-2 always trains LoRA (its family's default targets; as src.peft, never every weight), on a GPU with bf16
weights except the Q-Former and its query tokens (as --precision bf16-weights).
For GIT and BLIP-2 only our path is timed: the original template was BLIP's.

  original  padding="max_length" (512 tokens), labels include the padding, fp32, one random caption
            per image per step, each image encoded once per caption; captions the test set one
            image at a time, after decoding the full-resolution JPEG.
  ours      each batch padded to its longest caption, padding masked, every caption of each image
            in the batch with the image encoded once, bf16 autocast and fused AdamW on GPUs, fused
            attention (BLIP's vision encoder and text decoder, src/base/families/blip.py
            use_fused_attention); batched generate() after a reduced-size JPEG decode.

--compare-attention (BLIP) times the text decoder alone, forward + backward on a training batch of captions
cross-attending to random image features, with transformers' attention and with our fused attention: the same
weights and inputs, the two alternating step by step; the median step of each is reported.

Also measured: JPEG loading per core on the real VizWiz sample photos (tests/fixtures/vizwiz_sample),
peak memory, and on a GPU the model FLOPs utilisation (FLOPs counted by torch's FlopCounterMode).
"""
import argparse
import json
import os
import random
import resource
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from scripts.cache_images import build_cache  # noqa: E402
from src.base.cli import ArgumentParser  # noqa: E402
from src.base.data import CaptionCollator, ImageRecord, ImageTransform, default_num_workers, load_image  # noqa: E402
from src.base.engine import LossModule, caption_records, training_step  # noqa: E402
from src.base.precision import MasterWeights, to_bf16_weights  # noqa: E402
from src.base.families import Blip, Blip2, Git  # noqa: E402
from src.base.families.blip import use_fused_attention  # noqa: E402
from src.base.objectives import CrossEntropy  # noqa: E402

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures"  # real files kept in the repository
SAMPLE_DIR = FIXTURES / "vizwiz_sample" / "val"
BERT_TOKENIZER_DIR = FIXTURES / "hub_files" / "blip-image-captioning-base"
PEAK_TFLOPS = {"H100": {"bf16": 989.4, "fp32": 66.9}, "H200": {"bf16": 989.4, "fp32": 66.9},
               "A100": {"bf16": 312.0, "fp32": 19.5}}
VIZWIZ_TRAIN_CAPTIONS, VIZWIZ_TRAIN_IMAGES, VIZWIZ_VAL_IMAGES = 117_155, 23_431, 7_750
BOS, EOS, PAD = 30522, 102, 0  # BLIP's [DEC], [SEP], [PAD]
# family -> shape -> description; the first shape named in DEFAULT_SHAPE is the CPU default, the second the GPU one
FAMILIES = {"blip": Blip, "git": Git, "blip2": Blip2}
SHAPES = {
    "blip": {"tiny": "tiny (2 layers of 64)", "base": "BLIP-base (ViT-B/16, BERT-base decoder)",
             "large": "BLIP-large (ViT-L/16, BERT-base decoder)"},
    "git": {"tiny": "tiny (2 layers of 64)",
            "small": "small GIT (CLIP ViT, 6 layers of 384, patch 16; 4 text layers of 384)",
            "base": "git-base (CLIP ViT-B/16, 6 text layers of 768)",
            "large": "git-large (CLIP ViT-L/14, 6 text layers of 1024)"},
    "blip2": {"tiny": "tiny (2 layers of 64)",
              "small": "small BLIP-2 (ViT 6 layers of 384, patch 16; Q-Former 4 layers of 384, 32 queries; "
                       "OPT 4 layers of 512)",
              "opt-2.7b": "blip2-opt-2.7b (ViT-g/14, Q-Former, OPT-2.7b)"},
}
DEFAULT_SHAPE = {"blip": ("base", "base"), "git": ("small", "base"), "blip2": ("small", "opt-2.7b")}


def blip_config(shape, image_size):
    from transformers import BlipConfig
    vision = {"tiny": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4),
              "base": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
              "large": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16)}
    text = dict(vocab_size=30524, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
    if shape == "tiny":
        text.update(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4)
    text.update(encoder_hidden_size=vision[shape]["hidden_size"], bos_token_id=BOS, sep_token_id=EOS, pad_token_id=PAD)
    return BlipConfig(vision_config=dict(**vision[shape], image_size=image_size, patch_size=16, initializer_range=0.02),
                      text_config=text)


def git_config(shape, image_size):
    """GitConfig's defaults are microsoft/git-base's shapes; git-large has CLIP ViT-L/14 and a 1024-wide text side."""
    from transformers import GitConfig
    vision = {"tiny": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, patch_size=16),
              "small": dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=6, patch_size=16),
              "base": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, patch_size=16),
              "large": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                            patch_size=14)}
    text = {"tiny": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4),
            "small": dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=6),
            "base": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=6, num_attention_heads=12),
            "large": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=6, num_attention_heads=16)}
    return GitConfig(vision_config=dict(**vision[shape], image_size=image_size), **text[shape], vocab_size=30522,
                     pad_token_id=0, bos_token_id=101, eos_token_id=102)


def blip2_config(shape, image_size):
    """ViT, Q-Former (BERT-base with cross-attention every other layer, 32 queries) and OPT, as blip2-opt-2.7b;
    "small" is the same design at 4-6 layers of 384-512 (OPT's 50272-token vocabulary), "tiny" 2 layers of 64."""
    from transformers import Blip2Config
    vision = {"tiny": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, patch_size=16),
              "small": dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=6,
                            patch_size=16),
              "opt-2.7b": dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16,
                               patch_size=14)}[shape]
    qformer = {"tiny": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                            cross_attention_frequency=1),
               "small": dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=6,
                             cross_attention_frequency=2),
               "opt-2.7b": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                                cross_attention_frequency=2)}[shape]
    opt = {"tiny": dict(hidden_size=64, ffn_dim=256, num_hidden_layers=2, num_attention_heads=4),
           "small": dict(hidden_size=512, ffn_dim=2048, num_hidden_layers=4, num_attention_heads=8),
           "opt-2.7b": dict(hidden_size=2560, ffn_dim=10240, num_hidden_layers=32, num_attention_heads=32)}[shape]
    return Blip2Config(
        vision_config=dict(**vision, image_size=image_size),
        qformer_config=dict(**qformer, encoder_hidden_size=vision["hidden_size"]),
        text_config=dict(model_type="opt", **opt, word_embed_proj_dim=opt["hidden_size"], vocab_size=50272,
                         max_position_embeddings=2048, pad_token_id=1, bos_token_id=2, eos_token_id=50118),
        num_query_tokens=8 if shape == "tiny" else 32)


def bert_tokenizer():
    """bert-base-uncased's tokenizer (BLIP's and GIT's), from the Salesforce files kept in tests/fixtures."""
    from transformers import BertTokenizer
    return BertTokenizer.from_pretrained(BERT_TOKENIZER_DIR)


def processor_for(family, image_size):
    """The family's processor (image processor + tokenizer), built offline."""
    from transformers import BlipImageProcessor, BlipProcessor, CLIPImageProcessor, GitProcessor
    if family == "git":  # as microsoft/git-*: shorter side to image_size, then the centre square
        return GitProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": image_size},
                                                               crop_size={"height": image_size, "width": image_size}),
                            tokenizer=bert_tokenizer())
    image_processor = BlipImageProcessor(size={"height": image_size, "width": image_size})
    if family == "blip":
        return BlipProcessor(image_processor=image_processor, tokenizer=bert_tokenizer())
    from scripts.make_demo_assets import PRECANNED, TEMPLATES, opt_style_tokenizer
    return SimpleNamespace(image_processor=image_processor,  # OPT's tokenizer is not here offline: a small BPE
                           tokenizer=opt_style_tokenizer([t.format(c="red", s="circle", b="white") for t in TEMPLATES]
                                                         + [PRECANNED, "\n"]))


def build_model(args, device, lora, fused):
    """(model, its family, its image processor) with random weights, for args.family at args.shape."""
    from transformers import Blip2ForConditionalGeneration, BlipForConditionalGeneration, GitForCausalLM
    torch.manual_seed(0)
    config = {"blip": blip_config, "git": git_config, "blip2": blip2_config}[args.family](args.shape, args.image_size)
    model_class = {"blip": BlipForConditionalGeneration, "git": GitForCausalLM,
                   "blip2": Blip2ForConditionalGeneration}[args.family]
    with torch.device(device):
        model = model_class(config)
    family_class = FAMILIES[args.family]
    if args.family == "blip2" and device.type == "cuda" and torch.cuda.is_bf16_supported():
        to_bf16_weights(model)  # as a BLIP-2 run with --precision bf16-weights: Q-Former and query tokens fp32
    if fused and args.family == "blip":
        use_fused_attention(model)
    if lora or not family_class.full_fine_tuning:
        from src.base.lora import add_lora
        model = add_lora(model, 8, 32, 0.1, list(family_class.lora_targets))
    processor = processor_for(args.family, args.image_size)
    return model, family_class(config, processor), processor.image_processor


def synthetic_captions(rng, count, start=(BOS,), end=EOS):
    """Token-id lists with VizWiz-like lengths (about 13 words, 5 to 30), from `start` to `end`."""
    return [list(start) + [rng.randrange(1000, 30000) for _ in range(max(5, min(30, int(rng.gauss(13, 4)))))] + [end]
            for _ in range(count)]


def our_batch(rng, images, captions_per_image, image_size, family):
    samples = [{"pixel_values": torch.randn(3, image_size, image_size),
                "captions": synthetic_captions(rng, captions_per_image, family.prefix, family.end_id),
                "image_id": i} for i in range(images)]
    return CaptionCollator(family.pad_id, len(family.prefix))(samples)


def original_batch(rng, pairs, image_size):
    """The template's batch: one caption per image, padded to 512, labels = input_ids (padding not masked)."""
    input_ids = torch.full((pairs, 512), PAD, dtype=torch.long)
    attention_mask = torch.zeros((pairs, 512), dtype=torch.long)
    for row, ids in enumerate(synthetic_captions(rng, pairs)):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        attention_mask[row, :len(ids)] = 1
    return {"pixel_values": torch.randn(pairs, 3, image_size, image_size), "input_ids": input_ids,
            "attention_mask": attention_mask, "labels": input_ids.clone()}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def reset_memory(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # process-wide high-water mark, GiB


def time_steps(step, steps, warmup, device):
    for _ in range(warmup):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return (time.perf_counter() - start) / steps


def bench_train_ours(args, device, precision, compile_model=False):
    rng = random.Random(0)
    model, family, _ = build_model(args, device, args.lora, fused=True)
    objective = CrossEntropy(family)
    master = MasterWeights(model) if precision == "bf16-weights" else None  # as the Trainer does, before compile
    loss_model = LossModule(model)  # what the Trainer steps
    if compile_model:  # as the Trainer's --compile does
        loss_model.compile(dynamic=True)
    params = master.parameters() if master else [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda" or None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    batches = [our_batch(rng, args.batch_images, args.captions_per_image, args.image_size, family) for _ in range(3)]
    counter = iter(range(10**9))

    def step():
        training_step(loss_model, batches[next(counter) % 3], optimizer, scheduler, None, precision, device, 1.0,
                      objective, master=master)

    reset_memory(device)
    warmup = max(args.warmup, 6) if compile_model else args.warmup  # compile (and recompile per caption length) first
    seconds = time_steps(step, args.steps, warmup, device)
    captions = sum(b["num_captions"] for b in batches) / len(batches)
    result = {"captions_per_s": captions / seconds, "step_s": seconds, "peak_memory_gb": peak_memory_gb(device)}
    if device.type == "cuda" and not compile_model:
        result.update(model_flops_utilisation(loss_model, batches[0], optimizer, scheduler, precision, device, seconds,
                                              objective, master))
    return result


def bench_train_original(args, device):
    rng = random.Random(0)
    model, _, _ = build_model(args, device, args.lora, fused=False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    batches = [{k: v.to(device) for k, v in original_batch(rng, args.batch_images, args.image_size).items()}
               for _ in range(2)]
    counter = iter(range(10**9))
    model.train()

    def step():
        loss = model(**batches[next(counter) % 2]).loss  # fp32, whole model forward per caption
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    reset_memory(device)
    seconds = time_steps(step, max(2, args.steps // 2), 1, device)
    result = {"captions_per_s": args.batch_images / seconds, "step_s": seconds, "peak_memory_gb": peak_memory_gb(device)}
    return result


def bench_attention(args, device, precision):
    """The text decoder (BLIP) alone, forward + backward in training mode, with transformers' attention and with
    our fused attention: one model and a deep copy of it (same weights), the same captions and image features, the
    two alternating step by step so that both see the same machine load; median seconds per step of each."""
    import copy
    import statistics
    model, family, _ = build_model(args, device, lora=False, fused=False)
    plain = model.text_decoder.train()
    fused = use_fused_attention(copy.deepcopy(plain))
    del model
    rng = random.Random(0)
    batch = our_batch(rng, args.batch_images, args.captions_per_image, args.image_size, family)
    input_ids, attention_mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    vision = family.config.vision_config
    image_tokens = (args.image_size // vision.patch_size) ** 2 + 1
    torch.manual_seed(0)
    features = torch.randn(input_ids.shape[0], image_tokens, vision.hidden_size, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def step(decoder):
        with autocast:
            logits = decoder(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=features).logits
        logits.float().logsumexp(-1).mean().backward()
        decoder.zero_grad(set_to_none=True)
        return logits.detach()

    result = {"captions": input_ids.shape[0], "caption_tokens": input_ids.shape[1], "image_tokens": image_tokens}
    with torch.no_grad(), autocast:
        result["largest_logit_difference"] = (plain(input_ids=input_ids, attention_mask=attention_mask,
                                                    encoder_hidden_states=features).logits.float()
                                              - fused(input_ids=input_ids, attention_mask=attention_mask,
                                                      encoder_hidden_states=features).logits.float()).abs().max().item()
    for name, decoder in [("plain", plain), ("fused", fused)]:
        reset_memory(device)
        step(decoder)
        sync(device)
        if device.type == "cuda":
            result[f"{name}_peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
    for _ in range(args.warmup):
        step(plain), step(fused)
    times = {"plain": [], "fused": []}
    for _ in range(args.steps):
        for name, decoder in [("plain", plain), ("fused", fused)]:
            sync(device)
            start = time.perf_counter()
            step(decoder)
            sync(device)
            times[name].append(time.perf_counter() - start)
    result.update({f"{name}_step_s": statistics.median(t) for name, t in times.items()})
    result["speedup"] = result["plain_step_s"] / result["fused_step_s"]
    return result


def model_flops_utilisation(model, batch, optimizer, scheduler, precision, device, step_seconds, objective,
                            master=None):
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        training_step(model, batch, optimizer, scheduler, None, precision, device, 1.0, objective, master=master)
    precision = "bf16" if precision == "bf16-weights" else precision  # the same tensor-core peak
    flops = counter.get_total_flops()
    name = torch.cuda.get_device_name(device)
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    achieved = flops / step_seconds / 1e12
    return {"tflop_per_step": flops / 1e12, "achieved_tflops": achieved,
            "mfu": achieved / peak[precision if precision in peak else "fp32"] if peak else None}


def sample_jpegs(directory, count):
    paths = sorted(Path(directory).glob("*.jpg"))
    if not paths:
        raise SystemExit(f"error: {directory}: no JPEGs here (--sample-dir: a folder of real photos)")
    return [paths[i % len(paths)] for i in range(count)]


def bench_captioning(args, device, precision, ours):
    """Images captioned per second, JPEG decode included, same decoding settings on both paths."""
    model, family, processor = build_model(args, device, args.lora, fused=ours)
    model.eval()
    transform = ImageTransform(processor, use_draft=ours)
    count = args.caption_images if ours else max(4, args.caption_images // 8)
    paths = sample_jpegs(args.sample_dir, count)
    kwargs = dict(num_beams=args.num_beams, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                  length_penalty=1.0, repetition_penalty=1.0)

    def run():
        if ours:  # the real validation/test path: DataLoader workers decode, batched generate()
            records = [ImageRecord(i, path) for i, path in enumerate(paths)]
            settings = SimpleNamespace(eval_batch_size=args.caption_batch, num_workers=default_num_workers(),
                                       strict=False, ocr=False, mbr=0, **kwargs)
            caption_records(model, records, transform, family, settings, device, precision, "captioning")
        else:  # the template: the processor on a full-size decode, one image per generate() call
            for path in paths:
                pixels = processor(images=load_image(path), return_tensors="pt")["pixel_values"]
                family.decode(model.generate(pixel_values=pixels.to(device), **kwargs))

    with torch.no_grad():
        family.generate(model, torch.randn(2, 3, args.image_size, args.image_size, device=device), **kwargs)
        reset_memory(device)
        sync(device)
        start = time.perf_counter()
        run()
        sync(device)
    seconds = time.perf_counter() - start
    result = {"images_per_s": count / seconds, "peak_memory_gb": peak_memory_gb(device)}
    return result


def bench_loading(args):
    """Image -> model input tensor, one core: full decode + the family's image processor, reduced-size decode + our
    transform, and our transform reading the same photos from an image cache (scripts/cache_images.py)."""
    torch.set_num_threads(1)
    processor = processor_for(args.family, args.image_size).image_processor
    ours = ImageTransform(processor, use_draft=True)
    cached = ImageTransform(processor, use_draft=True)
    paths = sample_jpegs(args.sample_dir, 60)
    results = {}
    with tempfile.TemporaryDirectory() as cache_dir:
        records = [ImageRecord(i, path) for i, path in enumerate(sorted(set(paths)))]
        build_cache(records, cached, cache_dir, paths[0].parent.name)
        cached.use_caches(records, cache_dir)
        for name, load in [("original", lambda p: processor(images=load_image(p), return_tensors="pt")),
                           ("ours", lambda p: ours(ours.load(p))),
                           ("cached", lambda p: cached(cached.load(p)))]:
            load(paths[0])
            start = time.perf_counter()
            for path in paths:
                load(path)
            results[name] = {"images_per_s_per_core": len(paths) / (time.perf_counter() - start)}
    torch.set_num_threads(os.cpu_count() or 1)
    return results


def main():
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=list(FAMILIES), default="blip", help="captioner family (default blip)")
    parser.add_argument("--shape", choices=sorted({s for shapes in SHAPES.values() for s in shapes}), default=None,
                        help="model shapes, by family (see above; default: the family's CPU or GPU default)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="default: BLIP 384 on a GPU and 224 on the CPU; GIT and BLIP-2 224")
    parser.add_argument("--lora", action="store_true",
                        help="train LoRA (r=8, the family's default targets) instead of every weight (BLIP-2: always)")
    parser.add_argument("--batch-images", type=int, default=None, help="images per training step (default 16 GPU, 4 CPU)")
    parser.add_argument("--captions-per-image", type=int, default=5)
    parser.add_argument("--steps", type=int, default=None, help="timed training steps (default 20 GPU, 3 CPU)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--caption-images", type=int, default=None, help="images captioned by our path (default 256 GPU, 32 CPU)")
    parser.add_argument("--caption-batch", type=int, default=None, help="images per generate() call (default 64 GPU, 16 CPU)")
    parser.add_argument("--num-beams", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=20, help="caption length in tokens (fixed, both paths)")
    parser.add_argument("--compile", action="store_true", help="also time our training path under torch.compile")
    parser.add_argument("--bf16-weights", action="store_true",
                        help="also time our training path with --precision bf16-weights (bf16 weights, fp32 master "
                             "copies in the optimizer)")
    parser.add_argument("--compare-attention", action="store_true",
                        help="BLIP: also time the text decoder alone (forward + backward) with transformers' "
                             "attention and with our fused attention, side by side "
                             "(with --skip loading,train,caption: only that)")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: loading,train,caption,original")
    parser.add_argument("--sample-dir", default=str(SAMPLE_DIR), help="real JPEGs to decode (default: the VizWiz sample)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    args.shape = args.shape or DEFAULT_SHAPE[args.family][gpu]
    if args.shape not in SHAPES[args.family]:
        parser.error(f"--shape {args.shape}: {args.family} has shapes {', '.join(SHAPES[args.family])}")
    args.lora = args.lora or not FAMILIES[args.family].full_fine_tuning
    precision = "bf16" if gpu and torch.cuda.is_bf16_supported() else "fp32"
    args.image_size = args.image_size or (384 if gpu and args.family == "blip" else 224)
    args.batch_images = args.batch_images or (16 if gpu else 4)
    args.steps = args.steps or (20 if gpu else 3)
    args.caption_images = args.caption_images or (256 if gpu else 32)
    args.caption_batch = args.caption_batch or (64 if gpu else 16)
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = False  # the original ran plain fp32; ours uses bf16 autocast
    skip = set(filter(None, args.skip.split(",")))
    if args.family != "blip":
        skip.add("original")  # the original template trained and captioned BLIP only
        if args.compare_attention:
            parser.error("--compare-attention: the fused text-decoder attention is BLIP's (--family blip)")
    report = {"device": torch.cuda.get_device_name(device) if gpu else f"CPU ({os.cpu_count()} cores)",
              "torch": torch.__version__, "settings": vars(args), "precision_ours": precision,
              "model": SHAPES[args.family][args.shape]}

    if "loading" not in skip:
        report["loading"] = bench_loading(args)
    if "train" not in skip:
        report["train"] = {"ours": bench_train_ours(args, device, precision)}
        if "original" not in skip:
            report["train"]["original"] = bench_train_original(args, device)
        if args.compile:
            report["train"]["ours_compiled"] = bench_train_ours(args, device, precision, compile_model=True)
        if args.bf16_weights:
            report["train"]["ours_bf16_weights"] = bench_train_ours(args, device, "bf16-weights")
    if "caption" not in skip:
        report["caption"] = {"ours": bench_captioning(args, device, precision, ours=True)}
        if "original" not in skip:
            report["caption"]["original"] = bench_captioning(args, device, precision, ours=False)
    if args.compare_attention:
        report["attention"] = bench_attention(args, device, precision)
    print_table(report)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))


def print_table(report):
    s = report["settings"]
    print(f"device: {report['device']}, torch {report['torch']}; {s['family']} --shape {s['shape']}: {report['model']} "
          f"at {s['image_size']} px{', LoRA' if s['lora'] else ''}; ours in {report['precision_ours']}")
    if s["family"] != "blip":
        print("the original template's loop is BLIP's: only our path is timed (column 'original' n/a)")
    rows = []
    if "loading" in report:
        o, u = report["loading"]["original"]["images_per_s_per_core"], report["loading"]["ours"]["images_per_s_per_core"]
        rows.append(("JPEG loading, images/s per core (real sample photos)", o, u, ""))
        cached = report["loading"]["cached"]["images_per_s_per_core"]
        rows.append(("  same, read from the image cache (scripts/cache_images.py)", o, cached,
                     f"{cached / u:.1f}x our JPEG decode"))
    if "train" in report:
        t = report["train"]
        o, u = t.get("original", {}).get("captions_per_s"), t["ours"]["captions_per_s"]
        extra = f"peak memory {t['ours']['peak_memory_gb']:.1f} GB ours"
        if "original" in t:
            extra += f", {t['original']['peak_memory_gb']:.1f} GB original"
        if t["ours"].get("mfu") is not None:
            extra += f"; ours: {t['ours']['achieved_tflops']:.0f} TFLOP/s, MFU {100 * t['ours']['mfu']:.1f}%"
        rows.append(("training, captions/s", o, u, extra))
        if "ours_compiled" in t:
            rows.append(("training, captions/s, torch.compile", o, t["ours_compiled"]["captions_per_s"], ""))
        if "ours_bf16_weights" in t:
            w = t["ours_bf16_weights"]
            rows.append(("training, captions/s, --precision bf16-weights", o, w["captions_per_s"],
                         f"peak memory {w['peak_memory_gb']:.1f} GB" + (f"; MFU {100 * w['mfu']:.1f}%"
                                                                       if w.get("mfu") is not None else "")))
        print(f"estimated full VizWiz training epoch ({VIZWIZ_TRAIN_CAPTIONS:,} captions): "
              f"{VIZWIZ_TRAIN_CAPTIONS / u / 60:.1f} min ours"
              + (f", {VIZWIZ_TRAIN_CAPTIONS / o / 60:.1f} min original" if o else ""))
    if "caption" in report:
        c = report["caption"]
        o, u = c.get("original", {}).get("images_per_s"), c["ours"]["images_per_s"]
        rows.append(("test captioning, images/s (decode + generate)", o, u,
                     f"beams {s['num_beams']}, {s['new_tokens']} tokens, batch {s['caption_batch']}, "
                     f"peak memory {c['ours']['peak_memory_gb']:.1f} GB ours"))
        print(f"estimated validation pass ({VIZWIZ_VAL_IMAGES:,} images, compute only): {VIZWIZ_VAL_IMAGES / u / 60:.1f} min ours")
    if "attention" in report:
        a = report["attention"]
        memory = (f"; peak memory {a['plain_peak_memory_gb']:.2f} vs {a['fused_peak_memory_gb']:.2f} GB"
                  if "fused_peak_memory_gb" in a else "")
        print(f"text decoder forward + backward ({a['captions']} captions x {a['caption_tokens']} tokens, "
              f"{a['image_tokens']} image tokens, {report['precision_ours']}): transformers' attention "
              f"{1000 * a['plain_step_s']:.1f} ms, fused {1000 * a['fused_step_s']:.1f} ms per step, "
              f"{a['speedup']:.2f}x{memory}; largest logit difference {a['largest_logit_difference']:.1e}")
    if not rows:
        return
    width = max(len(r[0]) for r in rows)
    print(f"{'':{width}}  {'original':>10}  {'ours':>10}  {'ratio':>7}  (images {s['batch_images']} per training step, "
          f"{s['captions_per_image']} captions each)")
    for name, o, u, extra in rows:
        original, ratio = (f"{o:10.2f}", f"{u / o:6.1f}x") if o else (f"{'n/a':>10}", f"{'':7}")
        print(f"{name:{width}}  {original}  {u:10.2f}  {ratio}  {extra}")


if __name__ == "__main__":
    main()
