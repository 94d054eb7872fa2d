"""The training data a run's config names: a latent cache (fast), or images encoded on the fly.

`data.images` (a dataset root) selects the on-the-fly path, whatever `data.cache` says: each step reads,
crops and encodes its images with `data.vae` ("pixels" for pixel-space models), for users without a cache.
Otherwise batches come from the latent cache in `data.cache`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dit.autoencoder import Autoencoder, load_autoencoder
from dit.config import DataConfig, ModelConfig, TrainConfig
from dit.errors import UserError


@dataclass
class TrainingData:
    dataset: str  # the cache's dataset name; on the fly imagenet100 (Kaggle layout) or the root's folder name
    resolution: int  # of the images, in pixels
    latent_shape: tuple[int, int, int]  # what the model sees: (h, w, channels)
    num_classes: int
    cache: object | None  # the LatentCache; None on the on-the-fly path
    loaded_autoencoder: Autoencoder | None = None  # on the fly: data.vae's; a cache's is loaded on first use

    @property
    def autoencoder(self) -> Autoencoder:
        """What made the training latents, with their scale factor, and so what decodes samples: the cache's
        recorded autoencoder (the same VAE file, checked by its SHA-256), or on the fly data.vae's."""
        if self.loaded_autoencoder is None:
            recorded = self.cache.manifest["autoencoder"]
            self.loaded_autoencoder = load_autoencoder(recorded["source"], recorded["sha256"],
                                                       scale_factor=self.cache.scale_factor)
        return self.loaded_autoencoder

    def batches(self, data: DataConfig, train: TrainConfig):
        """This process's source of training batches, for `dit.train.train`."""
        from dit.data.pipeline import CacheBatches, ImageBatches
        if self.cache is not None:
            return CacheBatches(self.cache, train.batch_size, train.seed, flip=data.flip, repa=train.repa_weight > 0)
        return ImageBatches(data.images, self.autoencoder, data.resolution, train.batch_size, train.seed,
                            workers=data.workers, flip=data.flip)

    def check_model(self, model: ModelConfig, where: str, repa: bool = False) -> None:
        """The model must take these latents and labels (and with `repa`, the data must hold REPA targets with
        one token per model token); the error says which --set fixes it."""
        if repa:
            if self.cache is None:
                raise UserError("train.repa_weight > 0 needs REPA targets, which only a latent cache holds "
                                "(`python -m dit.data.extract ... --repa-encoder DINOV2`); train from that cache "
                                "(data.cache) instead of images on the fly, or set train.repa_weight=0.")
            tokens = self.cache.repa_shape[0]
            if tokens != model.num_tokens:
                raise UserError(
                    f"{where} holds REPA targets of {tokens} tokens, but the model makes {model.num_tokens} "
                    f"(a {model.grid_size}x{model.grid_size} grid of patches); REPA aligns them one to one. Use a "
                    f"patch size whose grid matches, or set train.repa_weight=0.")
        shape = (model.input_size, model.input_size, model.in_channels)
        if self.latent_shape != shape or self.num_classes != model.num_classes:
            h, w, c = self.latent_shape
            raise UserError(
                f"{where} gives {h}x{w}x{c} latents in {self.num_classes} classes, but the model expects "
                f"{shape[0]}x{shape[1]}x{shape[2]} in {model.num_classes}; pass --set model.input_size={h} "
                f"--set model.in_channels={c} --set model.num_classes={self.num_classes}, or other data.")


def training_data(data: DataConfig) -> TrainingData:
    """What `data` points at, checked: a missing cache or image root is a UserError naming the fix."""
    if data.images:
        return _on_the_fly(data)
    if not data.cache:
        raise UserError("no training data configured: set data.cache to a latent cache made by `python -m "
                        "dit.data.extract --data ROOT --vae stabilityai/sd-vae-ft-ema --out DIR` (--set data.cache=DIR), "
                        "or train on images encoded on the fly with --set data.images=ROOT.")
    from dit.data.cache import LatentCache
    cache = LatentCache(data.cache)
    return TrainingData(dataset=cache.manifest.get("dataset", "unknown"),
                        resolution=int(cache.manifest.get("resolution", 0)), latent_shape=tuple(cache.latent_shape),
                        num_classes=cache.num_classes, cache=cache)


def _on_the_fly(data: DataConfig) -> TrainingData:
    from dit.data.images import find_images
    image_set = find_images(data.images, "train")
    autoencoder = load_autoencoder(data.vae)
    if data.resolution % autoencoder.downsample:
        raise UserError(f"data.resolution={data.resolution} is not a multiple of the autoencoder's downsampling "
                        f"{autoencoder.downsample}; use a multiple, such as 256.")
    size = data.resolution // autoencoder.downsample
    # Named as `extract` names a cache, so runs on the fly and on a cache share a leaderboard group.
    dataset = "imagenet100" if image_set.layout == "imagenet100" else Path(image_set.root).resolve().name
    return TrainingData(dataset=dataset, resolution=data.resolution,
                        latent_shape=(size, size, autoencoder.latent_channels), num_classes=len(image_set.classes),
                        cache=None, loaded_autoencoder=autoencoder)
