"""`dcae cache-latents --model AE --data DIR... -o OUT`: encode a dataset once into latent shards for diffusion training.

Under torchrun each rank encodes its own shards (RANK / WORLD_SIZE / LOCAL_RANK from the environment); a rerun of the
same command skips the shards already written, so an interrupted run resumes where it stopped.
"""
from __future__ import annotations

import argparse
import os

from tqdm import tqdm

from dcae.commands.options import add_device_arguments
from dcae.diffusion.latents import STORAGE_DTYPES, cache_latents, list_labeled_images, plan_cache
from dcae.errors import DCAEError
from dcae.runtime import Runtime, load_model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="AE",
                        help="autoencoder: a save_pretrained folder / checkpoint / Hub id, or a preset name (random "
                             "weights, seed 0: for tests only)")
    parser.add_argument("--data", required=True, nargs="+", metavar="DIR",
                        help="image folders; the class is the top-level folder name, a flat folder is one class")
    parser.add_argument("-o", "--output", required=True, metavar="OUT", help="cache folder (created; resumable)")
    parser.add_argument("--resolution", type=int, default=256, help="centre-crop side in pixels (default: 256)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per encoder call (default: 16)")
    parser.add_argument("--flip", action="store_true", help="also store the latent of each mirrored image")
    parser.add_argument("--max-images", type=int, metavar="N",
                        help="cache only the first N images of the sorted list (quick runs)")
    parser.add_argument("--shard-size", type=int, default=1024, help="images per shard (default: 1024)")
    parser.add_argument("--storage-dtype", choices=tuple(STORAGE_DTYPES), default="float16",
                        help="dtype of stored latents (default: float16, half the disk of float32)")
    add_device_arguments(parser)


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1 or args.shard_size < 1 or args.resolution < 1:
        raise DCAEError("--batch-size, --shard-size and --resolution must be positive")
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    runtime = Runtime.choose(args.device, args.dtype)  # under torchrun, CUDA is LOCAL_RANK's GPU
    files, labels, class_names = list_labeled_images(args.data)
    if args.max_images is not None:
        if args.max_images < 1:
            raise DCAEError("--max-images must be positive")
        files, labels = files[:args.max_images], labels[:args.max_images]
    autoencoder, model_id = load_model(args.model, runtime.device, "cache-latents")
    index = plan_cache(files, labels, class_names, autoencoder, args.resolution, args.flip, args.storage_dtype,
                       args.shard_size, autoencoder_source=model_id)
    if rank == 0:
        runtime.announce("cache-latents")
    mine = sum(s["count"] for k, s in enumerate(index["shards"]) if k % world_size == rank)
    with tqdm(total=mine, unit="img", disable=rank != 0, desc="cache-latents") as bar:
        written = cache_latents(autoencoder, index, args.output, batch_size=args.batch_size, rank=rank,
                                world_size=world_size, device=runtime.device,
                                autocast=runtime.autocast, progress=bar.update)
    skipped = sum(1 for k in range(len(index["shards"])) if k % world_size == rank) - len(written)
    print(f"rank {rank}: wrote {len(written)} shards, {skipped} already present; {index['count']} images, "
          f"{index['num_classes']} classes, latent {index['latent_shape']} -> {args.output}")
    return 0
