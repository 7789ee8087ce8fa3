"""What a training step minimises: cross-entropy on the reference captions, or self-critical sequence training.

An objective has `loss(model, batch)` (a mean over the batch's units, with gradients) and
`units(batch)` (how many units that mean is over). The engine weights each micro-batch, and each
process, by its share of the units, so that gradient accumulation and several GPUs give the
gradient of one large batch (a stand-in batch, see data.StandIn, gets zero weight).
`take_stats(processes)`, called by every process at each validation, returns what metrics.jsonl
reports about training since the last call, over all processes.
"""
import time

import numpy as np
import torch

from .cider import CiderD
from .modeling import dropout_off, evaluation_mode
from .ptb import python_tokenize


class CrossEntropy:
    """Mean cross-entropy over the caption tokens of the batch (teacher forcing), with label smoothing."""
    name = "xe"

    def __init__(self, family, label_smoothing=0.0):
        self.family, self.label_smoothing = family, label_smoothing

    def units(self, batch):
        return int((batch["labels"][:, 1:] != -100).sum())  # the tokens the model predicts and is scored on

    def loss(self, model, batch):
        return self.family.loss(model, batch, self.label_smoothing)

    def take_stats(self, processes=None):
        return {}


class SelfCritical:
    """Self-critical sequence training (Rennie et al., 2017) with a CIDEr-D reward.

    For each image: draw `samples` captions, reward each with its CIDEr-D against the image's
    references (document frequencies from all training references, computed once), subtract a
    baseline (the mean reward of the image's other samples, or the reward of its greedy caption),
    and follow the policy gradient: loss = -(reward - baseline) * log p(caption), averaged.
    """
    name = "scst"

    def __init__(self, family, train_records, samples, baseline, max_new_tokens, temperature=1.0):
        if baseline == "mean" and samples < 2:
            raise ValueError("the mean-of-others baseline needs at least 2 samples per image")
        self.family, self.samples, self.baseline, self.max_new_tokens = family, samples, baseline, max_new_tokens
        self.temperature = temperature
        self.cider = CiderD.from_training(train_records)
        self.stats = self._no_stats()

    @staticmethod
    def _no_stats():
        return {"reward_sum": 0.0, "rewards": 0, "reward_seconds": 0.0}

    def units(self, batch):
        return batch["pixel_values"].shape[0] * self.samples

    def rewards(self, image_ids, sequences, prefix_lengths=None):
        """CIDEr-D of each sampled caption, read as validation reads captions; `image_ids` has one entry per sequence."""
        started = time.perf_counter()
        scores = self.cider.scores(image_ids, [python_tokenize(c) for c in self.family.decode(sequences, prefix_lengths)])
        self.stats["reward_seconds"] += time.perf_counter() - started
        return scores

    def loss(self, model, batch):
        """The policy is the model without dropout: captions are sampled (and the greedy baseline decoded) in eval
        mode, and their log-probabilities computed with every dropout layer off, so the gradient is that of the
        policy that chose them. Training mode with dropout (LoRA's, for one) would score other captions than the
        ones sampled, and with activation checkpointing transformers turns the KV cache off in training mode."""
        family, prefixes = self.family, batch.get("prefixes")  # each image's own prefix under --ocr
        with dropout_off(model):
            image_features = family.encode_images(model, batch["pixel_values"])
            with evaluation_mode(model):
                sequences, prefix_lengths = family.sample_from(model, image_features.detach(), prefixes, self.samples,
                                                               self.max_new_tokens, temperature=self.temperature)
                greedy = (family.sample_from(model, image_features.detach(), prefixes, 1, self.max_new_tokens,
                                             greedy=True) if self.baseline == "greedy" else None)
            image_ids = np.repeat(batch["image_ids"], self.samples)
            rewards = self.rewards(image_ids, sequences, prefix_lengths).reshape(-1, self.samples)
            if greedy is not None:
                baseline = self.rewards(batch["image_ids"], *greedy)[:, None]
            else:  # mean of the image's other samples: unbiased, and costs no extra decoding
                baseline = (rewards.sum(axis=1, keepdims=True) - rewards) / (self.samples - 1)
            if not batch.get("stand_in"):  # another process trains on this image
                self.stats["reward_sum"] += float(rewards.sum())
                self.stats["rewards"] += rewards.size
            advantage = torch.tensor((rewards - baseline).reshape(-1), dtype=torch.float32, device=sequences.device)
            log_probs, tokens = family.sequence_log_probs(
                model, image_features.repeat_interleave(self.samples, dim=0), sequences, self.temperature,
                prefix_lengths, self.max_new_tokens)
        # a mean over every sampled token, as self-critical.pytorch's RewardCriterion: a per-caption mean would
        # scale the step by the caption length (about 10x on VizWiz) and make the learning rate depend on it.
        # The engine weights micro-batches and processes by units() (samples), not by sampled tokens: with
        # --grad-accum or several GPUs this is the whole batch's per-token mean only when token counts are equal.
        return -(advantage * log_probs).sum() / tokens.sum().clamp(min=1)

    def take_stats(self, processes=None):
        """Since the last call: the mean reward of every caption sampled by any process, and the seconds a process
        spent computing rewards (the mean over processes)."""
        stats, self.stats = self.stats, self._no_stats()
        totals = [stats["reward_sum"], stats["rewards"], stats["reward_seconds"]]
        reward_sum, rewards, seconds = processes.sum(totals) if processes else totals
        world = processes.world if processes else 1
        return {"train_reward": reward_sum / rewards if rewards else None, "reward_seconds": round(seconds / world, 3)}


def make_objective(config, train_records, family):
    if config.objective == "scst":
        return SelfCritical(family, train_records, config.scst_samples, config.scst_baseline, config.max_new_tokens,
                            config.scst_temperature)
    return CrossEntropy(family, config.label_smoothing)
