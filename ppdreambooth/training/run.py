"""One training run, in order: check every input (no model is loaded before that) -> class images -> model ->
dataset -> `DreamBoothTrainer.train()` -> the final model in `--output_dir` -> exports, hub, summary. For its
duration the run holds `--output_dir` and handles SIGTERM/SIGINT; under data parallel a failing rank tells the
others."""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import os
import sys
from typing import Sequence

import paddle

from ppdreambooth.config.arguments import DataArguments, DreamBoothTrainingArguments, ModelArguments
from ppdreambooth.data.buckets import make_buckets, nearest_bucket
from ppdreambooth.data.class_images import free_slots, generate_class_images
from ppdreambooth.data.captions import CaptionOptions
from ppdreambooth.data.dataset import ConceptData, DreamBoothDataset, collate_arrays, mirror_with_prompt
from ppdreambooth.data.photos import collect_photos, load_image_set
from ppdreambooth.errors import ConfigError
from ppdreambooth.families import ModelFamily
from ppdreambooth.interop.exports import export
from ppdreambooth.interop.hub import push_to_hub
from ppdreambooth.interop.model_card import closing_summary, write_model_card
from ppdreambooth.interop.single_file import read_single_file
from ppdreambooth.modeling.build import build_model
from ppdreambooth.modeling.ema import WeightEMA
from ppdreambooth.modeling.lora_targets import adapter_summary, targets_chosen
from ppdreambooth.modeling.losses import MaskedLoss
from ppdreambooth.modeling.model import DreamBoothModel
from ppdreambooth.modeling.pivotal import spec_from_arguments
from ppdreambooth.modeling.schedulefree import ScheduleFreeWeights
from ppdreambooth.runtime import nodes, phases, ranks, run_lock
from ppdreambooth.runtime.nonfinite import NonFiniteLossError
from ppdreambooth.runtime.signals import ENDING, FINISHING, TrainingInterrupted, graceful_stop
from ppdreambooth.training.caching import cache_encodings
from ppdreambooth.training.callbacks import (EMACallback, PhaseCallback, PivotalFreezeCallback,
                                             StopTextEncoderCallback)
from ppdreambooth.training.console import ConsoleCallback, header, quiet_console
from ppdreambooth.training.fidelity_callback import fidelity_callback_for
from ppdreambooth.training.preflight import CheckedInputs, check_inputs
from ppdreambooth.training.resume_settings import class_files_now, current_settings
from ppdreambooth.training.run_folder import release_output_dir
from ppdreambooth.training.trainer import DreamBoothTrainer
from ppdreambooth.training.validation import ValidationCallback

logger = logging.getLogger("ppdreambooth")


def base_from_single_file(model_args: ModelArguments, args: DreamBoothTrainingArguments) -> None:
    """Train from a single-file checkpoint: convert it once into a ppdiffusers folder beside the run's outputs."""
    source = model_args.pretrained_model_name_or_path
    if not source.endswith(".safetensors"):
        return
    folder = os.path.join(args.output_dir, ".base-from-single-file")
    marker = os.path.join(folder, "single_file_source.json")
    missing = not os.path.isfile(marker)
    if args.world_size > 1:  # every rank takes the same path (with a folder per node, any node's lack counts)
        missing = bool(ranks.agree_max(int(missing)))
    if missing:
        # rank 0, or each node's first rank into its own folder (--save_on_each_node)
        if args.should_save and not os.path.isfile(marker):
            read_single_file(source, model_args.single_file_config, folder + ".tmp")
            os.replace(folder + ".tmp", folder)
        if args.world_size > 1:
            paddle.distributed.barrier()
    model_args.pretrained_model_name_or_path = folder


def prepare_class_images(family: ModelFamily, model_args: ModelArguments, data_args: DataArguments,
                         args: DreamBoothTrainingArguments):
    """Generate each concept's missing class images, split across ranks; every rank waits for all.

    A class folder every rank sees is filled once, each rank of every node generating its share; a folder on
    each node's own disk is filled on every node, by that node's ranks (slot k's image depends on slot k alone,
    so the nodes' copies are the same). Returns the class images of each concept."""
    concepts = data_args.concept_list
    shares = [(max(args.process_index, 0), max(args.world_size, 1))] * len(concepts)
    if args.world_size > 1:
        shares = [(max(args.process_index, 0), args.world_size)
                  if nodes.seen_by_every_rank(c.class_data_dir, max(args.process_index, 0))
                  else nodes.node_share(args.local_process_index, args.world_size) for c in concepts]
    slots = [free_slots(c.class_data_dir, c.num_class_images) for c in concepts]
    if args.world_size > 1:
        paddle.distributed.barrier()  # every rank has listed the free slots before any rank writes
    for concept, free, (index, count) in zip(concepts, slots, shares):
        generate_class_images(
            model_args.pretrained_model_name_or_path,
            concept.class_data_dir,
            concept.class_prompt,
            free[index::count],
            sample_batch_size=data_args.sample_batch_size,
            num_inference_steps=data_args.class_image_inference_steps,
            seed=args.seed,
            revision=model_args.revision,
            image_size=(data_args.resolution, data_args.resolution) if data_args.enable_bucket else data_args.image_size,
            show_progress=args.process_index <= 0,
            family=family,
        )
    if args.world_size > 1:
        paddle.distributed.barrier()
    return [collect_photos(c.class_data_dir, "class_data_dir") for c in concepts]


def build_dataset(model: DreamBoothModel, data_args: DataArguments, instance_photos, class_photos):
    """One ConceptData per concept; sizes are the training size or, with buckets, each image's bucket. With pivotal
    tuning the instance prompts and captions read the new tokens in place of the abstraction (class prompts not)."""
    spec = model.pivotal_tokens.spec if model.pivotal_tokens is not None else None
    instance_tokenize = model.tokenize if spec is None else (lambda text: model.tokenize(spec.apply(text)))
    if data_args.enable_bucket:
        buckets = make_buckets(data_args.resolution, data_args.min_bucket_reso, data_args.max_bucket_reso,
                               data_args.bucket_reso_steps)

        def size_of(h, w):
            return nearest_bucket(h, w, buckets)
    else:
        def size_of(h, w):
            return data_args.image_size

    concepts = []
    for n, concept in enumerate(data_args.concept_list):
        instance = load_image_set(instance_photos[n], concept.instance_prompt, instance_tokenize, size_of,
                                  data_args.caption_extension)
        prior, mirrored = None, model.base_prediction_prior
        if mirrored:  # the instance examples again, under the class prompt
            prior = mirror_with_prompt(instance, model.tokenize(concept.class_prompt))
        elif class_photos is not None:
            prior = load_image_set(class_photos[n], concept.class_prompt, model.tokenize, size_of)
        concepts.append(ConceptData(instance, prior, concept.repeats, prior_mirrors_instance=mirrored))
    captions = CaptionOptions(dropout_rate=data_args.caption_dropout_rate, shuffle=data_args.shuffle_caption,
                              keep_tokens=data_args.keep_tokens, tag_dropout_rate=data_args.caption_tag_dropout_rate)
    return DreamBoothDataset(concepts, center_crop=data_args.center_crop or data_args.enable_bucket,
                             random_flip=data_args.random_flip, size_conditioning=model.family.size_conditioning,
                             captions=captions, tokenize=instance_tokenize,
                             mask_factor=model.vae_scale_factor if data_args.masked_loss else None)


@contextlib.contextmanager
def import_time_objects_frozen():
    """Exempt the objects that exist now (the ~340k the imports of Paddle, PaddleNLP and ppdiffusers created)
    from garbage-collection scans for the run, and hand them back to the collector afterwards.

    ppdiffusers calls `gc.collect()` after loading each model; each call scanned all of them (three times for SD
    and once more per component of a class-image pipeline; `benchmarks/bench_startup.py` measures it). Garbage
    made during the run is collected as before."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def run(
    model_args: ModelArguments,
    data_args: DataArguments,
    args: DreamBoothTrainingArguments,
    callbacks: Sequence = (),
) -> DreamBoothTrainer:
    """Train and write the final model; `callbacks` are extra PaddleNLP TrainerCallbacks (benchmarks).

    For its duration the run holds `--output_dir` (one run per folder) and handles SIGTERM/SIGINT
    (`ppdreambooth.runtime.signals`); under data parallel a rank that fails tells the others, which stop too."""
    with graceful_stop() as stop, import_time_objects_frozen():
        watch, ranks.progress["step"] = None, None
        try:
            checked = check_inputs(model_args, data_args, args)
            if stop is not None:
                stop.before_exit.append(run_lock.release_all)  # a second signal exits at once
            if args.world_size > 1:
                watch = ranks.PeerWatch(args.output_dir, max(args.process_index, 0), args.world_size,
                                        before_exit=run_lock.release_all).start()
            return _train(model_args, data_args, args, callbacks, checked, stop)
        except BaseException as e:
            if stop is not None:
                stop.enter(ENDING)
            if watch is not None:
                watch.stop()
                # Every rank reaches a ConfigError, a non-finite loss or a signal stop in training together;
                # anything else (an exception, a signal before training) leaves the others waiting for this one.
                agreed = isinstance(e, (ConfigError, NonFiniteLossError)) or (
                    isinstance(e, TrainingInterrupted) and (e.checkpoint or e.final_model))
                if not agreed:
                    rank = max(args.process_index, 0)
                    peer = ranks.peer_failure(args.output_dir, rank, args.world_size)
                    if peer is None:  # this rank failed first: tell the others
                        status = e.exit_status if isinstance(e, TrainingInterrupted) else ranks.PEER_FAILED_EXIT
                        ranks.announce_failure(args.output_dir, rank, e, status)
                    else:
                        print(f"ppdreambooth: error: {ranks.describe_note(peer)}; this rank stopped as well",
                              file=sys.stderr, flush=True)
            raise
        finally:
            if watch is not None:
                watch.stop()
            release_output_dir(args)


def _train(model_args: ModelArguments, data_args: DataArguments, args: DreamBoothTrainingArguments, callbacks,
           checked: CheckedInputs, stop) -> DreamBoothTrainer:
    family, resume = checked.family, checked.resume
    instance_photos = checked.take_photos()  # held here only, until the dataset has resized them
    rank = max(args.process_index, 0)
    log_path = quiet_console(args.output_dir, args.log_level, rank)  # after the checks: nothing written before
    source = model_args.pretrained_model_name_or_path  # what the user named (a single file is converted next)
    base_from_single_file(model_args, args)
    base_prediction = data_args.with_prior_preservation and data_args.prior_preservation_mode == "base_prediction"
    class_photos = None
    phases.mark("start-up")  # imports, input checks
    if data_args.with_prior_preservation and not base_prediction:
        class_photos = prepare_class_images(family, model_args, data_args, args)
        phases.mark("class images")
    pivotal = spec_from_arguments(model_args)
    if pivotal is not None:  # the identifier becomes the new tokens wherever the subject is prompted
        data_args.concept_list = [dataclasses.replace(c, instance_prompt=pivotal.apply(c.instance_prompt))
                                  for c in data_args.concept_list]
        args.validation_prompt = pivotal.apply(args.validation_prompt)
    paddle.seed(args.seed)  # LoRA layers are initialised at random: the same seed gives the same start
    with paddle.utils.unique_name.guard():  # parameter names (and so optimizer state keys) start from zero
        model = build_model(
            model_args,
            with_prior_preservation=data_args.with_prior_preservation,
            recompute=args.recompute,
            memory_efficient_attention=args.enable_xformers_memory_efficient_attention,
            family=family,
            base_prediction_prior=base_prediction,
            masked_loss=MaskedLoss(data_args.masked_loss_unmasked_weight, data_args.masked_loss_normalize)
            if data_args.masked_loss else None,
        )
    phases.mark("load")
    dataset = build_dataset(model, data_args, instance_photos, class_photos)
    phases.mark("dataset")
    if rank == 0:
        adapters = sum(int(p.numel()) for p in model.trainable_parameters()) if model_args.use_lora else None
        targets = adapter_summary(model, model_args) if model_args.use_lora and targets_chosen(model_args) else ""
        print(header(family, model_args, data_args, args, dataset, log_path, adapters, targets), flush=True)
    if resume is not None:
        step = int(os.path.basename(os.path.normpath(resume)).rsplit("-", 1)[-1])
        logger.info("resuming from %s at global step %d", resume, step)
    validating = bool(args.validation_prompt)
    generating = validating or bool(args.evaluate_every_n_checkpoints or args.evaluate_at_end)  # needs encoders
    cached = cache_encodings(model, dataset, not data_args.no_cache_latents, keep_encoders=generating)
    phases.mark("caching")
    ema = WeightEMA(model, args.ema_decay) if args.use_ema else None
    # The weights validation images and scoring see: the EMA, or schedule-free AdamW's average x (its optimizer
    # is attached when the trainer builds it); never both (refused with the arguments).
    schedule_free = ScheduleFreeWeights() if args.optim == "adamw_schedulefree" else None
    averaged = ema if ema is not None else schedule_free
    callbacks = list(callbacks)
    if ema is not None:
        callbacks.append(EMACallback(ema))  # before validation: images use the updated average
    if args.stop_text_encoder_training is not None:
        callbacks.append(StopTextEncoderCallback(model, args.stop_text_encoder_training))
    if pivotal is not None:
        callbacks.append(PivotalFreezeCallback(model, args.world_size))
    if validating:
        callbacks.append(ValidationCallback(model, averaged))
    fidelity = fidelity_callback_for(model, data_args, args, instance_photos[0], averaged)
    settings = current_settings(model_args, args, family, [[p.path for p in photos] for photos in instance_photos],
                                class_files_now(data_args.concept_list, class_photos is not None))
    del instance_photos, class_photos  # the dataset holds the resized images; drop the full-size ones
    if fidelity is not None:
        callbacks.append(fidelity)
    callbacks.append(ConsoleCallback())
    callbacks.append(PhaseCallback())
    trainer = DreamBoothTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=collate_arrays,
        callbacks=callbacks or None,
        base_model=model_args.pretrained_model_name_or_path,
        base_revision=model_args.revision,
        base_vae=model_args.pretrained_vae_model_name_or_path,
        run_settings=settings,
        ema=ema,
        schedule_free=schedule_free,
        stop=stop,
    )
    model.set_text_encoder_learning_rate(args.learning_rate, args.text_encoder_learning_rate)
    if args.decay_bias_and_norm:  # the seed script's AdamW: weight decay on every trained weight
        trainer.set_optimizer_grouped_parameters(model.trainable_parameters())
    # otherwise the Trainer builds AdamW itself, exempting every parameter named *bias* or *norm* from decay
    if resume is None:
        # The Trainer seeds every data-parallel rank alike; give each its own noise and timesteps.
        paddle.seed(args.seed + max(args.process_index, 0))
    trainer.train(resume_from_checkpoint=resume)
    if stop is not None:
        stop.enter(FINISHING)  # a signal from here lets the final model be written, then stops
    trainer.save_model()
    phases.mark("final save")
    if args.should_save:
        write_model_card(args.output_dir, model_args, data_args, args, trainer.state.global_step, family, source)
    if stop is not None and stop.requested:
        raise TrainingInterrupted(stop.signum, final_model=args.output_dir)
    if args.should_save:
        for fmt in args.export_format_list:
            export(args.output_dir, fmt, os.path.join(args.output_dir, f"export-{fmt}"))
        if args.push_to_hub and args.process_index <= 0:  # once, also when each node keeps a copy
            push_to_hub(args.output_dir, args.hub_model_id, args.hub_token)
        print(closing_summary(args.output_dir, model_args, args, cached, family), flush=True)
    return trainer
