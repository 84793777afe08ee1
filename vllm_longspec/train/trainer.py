"""The training loop: stages of AdamW steps, checkpoints, exact resume, export.

Per optimiser step: set the stage's warmup+cosine lr, take ``grad_accum``
micro-batches from the stage's packed stream (or its feature cache), draw AOI
positions (cache: a pure position shift) and the noise shift from the step's
own generator, run the target (not with a cache), backpropagate each
micro-batch's share of the loss, clip the gradient norm, step AdamW. Every
``checkpoint_every`` steps (and at the end of each stage) the full trainer
state goes atomically to ``output_dir/checkpoint-last.pt`` and the loss curve
is redrawn; at the end the draft is exported to ``output_dir/draft`` with
``save_draft``, in our layout or the reference code's (``layout="published"``).

Resuming loads that checkpoint and continues bit-for-bit: weights, optimiser
moments, step counters (the lr depends only on them), the data position, RNG.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from vllm_longspec.model.checkpoint import DRAFT_VOCAB, DraftCheckpointError
from vllm_longspec.train.config import StageConfig, TrainConfig
from vllm_longspec.train.data import PackedStream, stage_stream
from vllm_longspec.train.exclusions import ExclusionSet
from vllm_longspec.train.features import (
    CachedStream,
    FeatureCache,
    FeatureSpec,
    check_cache_for_stage,
    pure_shift,
)
from vllm_longspec.train.init_from_target import init_from_target_layer
from vllm_longspec.train.loss import NUM_STATS
from vllm_longspec.train.metrics import MetricsLog, plot_loss_curve
from vllm_longspec.train.model import load_draft_weights, new_draft
from vllm_longspec.train.schedule import warmup_cosine_lr
from vllm_longspec.train.step import (
    MicroBatch,
    TargetFeatures,
    draw_noise_shift,
    live_features,
    loss_mask_for,
    loss_tokens,
    make_micro_batch,
    micro_batch_loss,
    step_generator,
)
from vllm_longspec.train.target import (
    check_target_config,
    lm_head_weight,
    load_target,
    read_target_config,
)
from vllm_longspec.train.trainer_checkpoint import (
    checkpoint_path,
    load_checkpoint,
    restore_rng_states,
    rng_states,
    save_checkpoint,
)
from vllm_longspec.train.vocab_map import VocabMap, read_draft_vocab

log = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclasses.dataclass
class Progress:
    stage_index: int = 0
    stage_step: int = 0  # optimiser steps done in the current stage
    global_step: int = 0
    tokens_seen: int = 0
    last_loss: float | None = None


def resolve_target_path(config: TrainConfig) -> Path:
    if config.target:
        return Path(config.target).expanduser()
    from vllm_longspec.assets import default_target_path

    return default_target_path()


def _optimizer(draft: torch.nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not on biases and norm scales)."""
    params = list(draft.parameters())
    groups = [
        {"params": [p for p in params if p.ndim >= 2],
         "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=0.0, betas=tuple(config.betas))


class Trainer:
    def __init__(self, config: TrainConfig, resume: bool = False):
        self.config = config
        self.output_dir = Path(config.output_dir).expanduser()
        existing = checkpoint_path(self.output_dir)
        if existing.is_file() and not resume:
            raise FileExistsError(
                f"{existing} exists: pass --resume to continue that run, or choose "
                "another output_dir."
            )
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.target_path = resolve_target_path(config)
        self.target_config = read_target_config(self.target_path)
        check_target_config(self.target_config)
        self.max_positions = self.target_config["max_position_embeddings"]
        for stage in config.stages:
            if stage.seq_len > self.max_positions:
                raise ValueError(
                    f"stage {stage.name!r}: seq_len {stage.seq_len} exceeds the "
                    f"target's max_position_embeddings {self.max_positions}."
                )
        self.device = torch.device(config.device)
        self.target = load_target(self.target_path, DTYPES[config.target_dtype]).to(
            self.device)
        torch.manual_seed(config.seed)
        self.draft = new_draft(self.target_config, config.sliding_window, config.seed)
        if config.init_from:
            load_draft_weights(self.draft, Path(config.init_from).expanduser())
            log.info("initialised the draft from %s", config.init_from)
        elif config.init_from_target_layer is not None:
            init_from_target_layer(self.draft, self.target, config.init_from_target_layer)
            log.info("initialised the draft from the target's decoder layer %d",
                     config.init_from_target_layer)
        self.draft.to(self.device)
        self.draft.train()
        vocab_ids = read_draft_vocab(config.draft_vocab) if config.draft_vocab else None
        self.vocab = VocabMap.build(self.target_config["vocab_size"], vocab_ids)
        # [draft_vocab, hidden]: the LM-head rows the loss's softmax runs over
        self.head = self.vocab.head(lm_head_weight(self.target))
        self._check_feature_caches()
        self.optimizer = _optimizer(self.draft, config)
        self.exclusions = ExclusionSet.from_config(
            config.exclude_paths, config.exclude_list_file
        )
        self.metrics = MetricsLog(self.output_dir / "metrics.jsonl")
        self.progress = Progress()
        self.stream: PackedStream | CachedStream | None = None
        self._pending_data_state: dict[str, int] | None = None
        self._tokenizer = None

        if resume and existing.is_file():
            self._restore(load_checkpoint(existing))
        else:
            if resume:
                log.info("no checkpoint in %s: starting from scratch", self.output_dir)
            self.metrics.truncate_after(0)  # lines of a run that never checkpointed

    # -- data -------------------------------------------------------------

    def _check_feature_caches(self) -> None:
        """Every cache a stage names exists, is complete and fits it (before step 1)."""
        need_top_k = (self.config.distill_top_k or 0) if self.config.distill_weight else 0
        for stage_index, stage in enumerate(self.config.stages):
            if stage.features:
                expected = FeatureSpec.for_stage(self.config, stage_index,
                                                 self.target_path, self.target_config)
                check_cache_for_stage(FeatureCache(stage.features_path()).spec,
                                      expected, need_top_k)

    def _stream_for(self, stage_index: int) -> PackedStream | CachedStream:
        if self.stream is None:
            stage = self.config.stages[stage_index]
            if stage.features:
                self.stream = CachedStream(FeatureCache(stage.features_path()),
                                           self.config.seed, stage_index)
            else:
                self.stream, self._tokenizer = stage_stream(
                    stage, stage_index, self.config.seed, self.exclusions,
                    self.target_path, self._tokenizer)
            if self._pending_data_state is not None:
                self.stream.load_state_dict(self._pending_data_state)
                self._pending_data_state = None
        return self.stream

    def _micro_batches(
        self, stage: StageConfig, stream: PackedStream | CachedStream,
        generator: torch.Generator,
    ) -> list[tuple[MicroBatch, TargetFeatures | None]]:
        """The step's micro-batches; features come with them from a cache, else
        None (the target runs on each in turn, so one set is alive at a time)."""
        config, count = self.config, stage.sequences_per_micro_batch
        noise_range = tuple(config.noise_shift)
        batches = []
        for _ in range(stage.grad_accum):
            if isinstance(stream, CachedStream):
                cached = stream.next_batch(count)
                positions = cached.position_ids
                if stage.aoi:
                    positions = pure_shift(positions, self.max_positions, generator)
                micro_batch = MicroBatch(cached.input_ids,
                                         loss_mask_for(stage.loss_on, cached.loss_mask), positions,
                                         draw_noise_shift(generator, noise_range))
                batches.append((micro_batch.to(self.device),
                                cached.features.to(self.device)))
            else:
                input_ids, loss_mask = stream.next_batch(count)
                micro_batch = make_micro_batch(
                    input_ids, loss_mask_for(stage.loss_on, loss_mask), generator, stage.aoi,
                    self.max_positions, config.aoi_max_anchors, noise_range)
                batches.append((micro_batch.to(self.device), None))
        return batches

    def _live_features(self, micro_batch: MicroBatch) -> TargetFeatures:
        config = self.config
        teacher = None
        if config.distill_weight > 0:
            teacher = "top_k" if config.distill_top_k else "full"
        return live_features(self.target, micro_batch, teacher, config.distill_top_k)

    # -- one step ----------------------------------------------------------

    def _train_step(self, stage: StageConfig, stream: PackedStream) -> dict[str, Any]:
        config, progress = self.config, self.progress
        started = time.perf_counter()
        lr = warmup_cosine_lr(progress.stage_step, stage.num_steps, stage.lr,
                              stage.warmup_fraction, config.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        generator = step_generator(config.seed, progress.global_step)
        micro_batches = self._micro_batches(stage, stream, generator)
        step_loss_tokens = sum(loss_tokens(mb.loss_mask) for mb, _ in micro_batches)
        total_loss, stats = 0.0, torch.zeros(NUM_STATS, dtype=torch.float64)
        for micro_batch, features in micro_batches:
            if features is None:
                features = self._live_features(micro_batch)
            loss, micro_stats = micro_batch_loss(
                self.draft, self.target, micro_batch, features, step_loss_tokens,
                self.vocab, self.head, distill_weight=config.distill_weight,
                distill_top_k=config.distill_top_k,
                chunk_rows=config.loss_chunk_rows,
                autocast_dtype=(torch.bfloat16
                                if config.autocast_dtype == "bfloat16" else None),
            )
            del features
            loss.backward()
            total_loss += loss.item()
            stats += micro_stats.cpu()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.draft.parameters(),
                                                   config.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

        progress.stage_step += 1
        progress.global_step += 1
        progress.tokens_seen += stage.batch_tokens
        progress.last_loss = total_loss
        elapsed = time.perf_counter() - started
        rows = max(1.0, float(stats[3]))
        in_vocab_rows = max(1.0, float(stats[3] - stats[4]))
        return {
            "step": progress.global_step, "stage": stage.name,
            "stage_step": progress.stage_step, "lr": lr, "loss": total_loss,
            "ce": float(stats[0]) / in_vocab_rows, "kl": float(stats[1]) / rows,
            "top1_acc": float(stats[2]) / rows, "outside_vocab": float(stats[4]) / rows,
            "grad_norm": float(grad_norm),
            "loss_tokens": step_loss_tokens, "tokens": progress.tokens_seen,
            "noise_shift": [mb.noise_shift for mb, _ in micro_batches],
            "step_seconds": elapsed, "tokens_per_s": stage.batch_tokens / elapsed,
        }

    # -- the loop ----------------------------------------------------------

    def run(self, max_steps: int | None = None, layout: str = "longspec",
            max_seconds: float | None = None) -> Path | None:
        """Train to the end and export (returns the draft dir); with ``max_steps``,
        stop after that many steps of this run with a checkpoint (returns None),
        and likewise after the step that ends ``max_seconds`` into this run.
        ``layout`` is the export's (``save_draft``), checked before training."""
        if layout == "published":
            from vllm_longspec.model.checkpoint import check_publishable

            check_publishable(self.target_config, self.config.sliding_window)
            if self.vocab.ids is not None:
                raise DraftCheckpointError(
                    "the published layout has no place for the draft vocabulary "
                    "this run trains with (draft_vocab): export with layout longspec.")
        stages, steps_this_run = self.config.stages, 0
        deadline = None if max_seconds is None else time.monotonic() + max_seconds
        while self.progress.stage_index < len(stages):
            stage = stages[self.progress.stage_index]
            stream = self._stream_for(self.progress.stage_index)
            bar = tqdm(total=stage.num_steps, initial=self.progress.stage_step,
                       desc=f"{stage.name}", unit="step", dynamic_ncols=True)
            while self.progress.stage_step < stage.num_steps:
                record = self._train_step(stage, stream)
                steps_this_run += 1
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.3f}",
                                acc=f"{record['top1_acc']:.3f}",
                                tok_s=f"{record['tokens_per_s']:.0f}")
                if record["step"] % self.config.log_every == 0:
                    self.metrics.append(record)
                stop = ((max_steps is not None and steps_this_run >= max_steps)
                        or (deadline is not None and time.monotonic() >= deadline))
                if record["step"] % self.config.checkpoint_every == 0 or stop:
                    self.save()
                if stop:
                    bar.close()
                    return None
            bar.close()
            self.progress.stage_index += 1
            self.progress.stage_step = 0
            self.stream = None
            self.save()
        return self.export(layout)

    # -- state -------------------------------------------------------------

    def save(self) -> None:
        state = {
            "format_version": 1,
            "config": self.config.to_dict(),
            "draft": self.draft.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "progress": dataclasses.asdict(self.progress),
            "data": self.stream.state_dict() if self.stream is not None else None,
            "rng": rng_states(),
        }
        save_checkpoint(checkpoint_path(self.output_dir), state)
        plot_loss_curve(self.metrics.records(), self.output_dir / "loss_curve.png")

    def _restore(self, state: dict[str, Any]) -> None:
        changed = sorted(
            key for key, value in self.config.to_dict().items()
            if state["config"].get(key) != value
        )
        if changed:
            log.warning("resuming with a changed config: %s", ", ".join(changed))
        self.draft.load_state_dict(state["draft"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.progress = Progress(**state["progress"])
        self._pending_data_state = state["data"]
        restore_rng_states(state["rng"])
        self.metrics.truncate_after(self.progress.global_step)
        log.info("resumed at step %d (stage %d, step %d of it)",
                 self.progress.global_step, self.progress.stage_index,
                 self.progress.stage_step)

    def _export_state(self) -> dict[str, torch.Tensor]:
        """The draft's weights, plus the draft vocabulary it was trained over."""
        state = dict(self.draft.state_dict())
        if self.vocab.ids is not None:
            state[DRAFT_VOCAB] = self.vocab.ids
        return state

    def _draft_vocab_settings(self) -> dict[str, int]:
        return {} if self.vocab.ids is None else {"draft_vocab_size": self.vocab.size}

    def _init_summary(self) -> str:
        """Where the draft's weights started (the export's ``trained.init``)."""
        if self.config.init_from:
            return f"draft:{self.config.init_from}"
        if self.config.init_from_target_layer is not None:
            return f"target-layer:{self.config.init_from_target_layer}"
        return "random"

    def export(self, layout: str = "longspec", directory: Path | None = None) -> Path:
        """Write the draft as it stands to ``directory`` (default ``output_dir/draft``);
        layout "published" is the reference code's (no ``longspec`` section: the
        summary below is then not stored)."""
        from vllm_longspec.model.checkpoint import save_draft

        summary = {
            "steps": self.progress.global_step,
            "tokens": self.progress.tokens_seen,
            "final_loss": self.progress.last_loss,
            "stages": [
                {"name": s.name, "steps": s.num_steps, "seq_len": s.seq_len,
                 "aoi": s.aoi, "lr": s.lr} for s in self.config.stages
            ],
            "noise_shift": list(self.config.noise_shift),
            "distill_weight": self.config.distill_weight,
            "seed": self.config.seed,
            "init": self._init_summary(),
            "excluded_files": len(self.exclusions.skipped),
        }
        directory = save_draft(
            directory or self.output_dir / "draft", self._export_state(), self.target_config,
            {"sliding_window": self.config.sliding_window,
             "target": str(self.target_path), "trained": summary,
             **self._draft_vocab_settings()},
            layout=layout,
        )
        log.info("exported the draft to %s", directory)
        return directory
