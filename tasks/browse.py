"""Look at a dataset before training on it: `python -m tasks.browse dataset=... [split=val] [augment=true] [n=16]`.

Thin: tasks/analysis/browse.py draws the grid and the label statistics."""
from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from tasks.analysis.browse import browse
from tasks.analysis.evaluation_report import normalisation
from tasks.cli import run
from tasks.errors import USER_ERRORS, ConfigError, user_errors_exit


def _instantiate(node):
    try:
        return instantiate(node)
    except InstantiationException as err:  # Hydra's wrapper hides a user error's one sentence
        if isinstance(err.__cause__, USER_ERRORS):
            raise err.__cause__ from None
        raise


def browse_dataset(cfg: DictConfig, out_dir: str | Path) -> dict[str, Path]:
    """The entry point's work on a composed browse config: the grid and the statistics in `out_dir`."""
    if cfg.split not in ("train", "val"):
        raise ConfigError(f"split={cfg.split} is not a split; expected train or val.")
    if cfg.dataset.get("prepare") is not None:
        _instantiate(cfg.dataset.prepare)
    dataset = _instantiate(cfg.dataset[cfg.split])
    config = OmegaConf.to_container(cfg, resolve=True)
    transforms = (config["dataset"][cfg.split] or {}).get("transforms") or {}
    mean, std = normalisation({"dataset": {"val": {"transforms": transforms}}})
    return browse(dataset, cfg.dataset.task, cfg.split, out_dir, n=int(cfg.n), augment=bool(cfg.augment),
                  seed=int(cfg.seed), head=config.get("head"), mean=mean, std=std,
                  stats_images=cfg.stats_images, columns=cfg.columns, tile_width=int(cfg.tile_width))


@hydra.main(config_path="../conf", config_name="browse", version_base="1.3")
@user_errors_exit
def main(cfg: DictConfig) -> None:
    out_dir = Path(cfg.output_dir) if cfg.output_dir else Path(HydraConfig.get().runtime.output_dir)
    written = browse_dataset(cfg, out_dir)
    print(f"{cfg.split} images with their ground truth: {written['samples']}")
    print(f"label statistics: {written['labels']}")


def cli() -> None:
    """Console-script and `python -m` entry: a bad command line stops with one sentence."""
    run(main, "browse")


if __name__ == "__main__":
    cli()
