"""Check a dataset before training on it: every file parses, every image exists, ids and boxes make sense.

    python -m tasks.check_data dataset=coco dataset.root=/data/coco [decode=true]

Exit code 0 with a summary when the data can be trained on, 2 with one sentence when it cannot.
`check_dataset(cfg.dataset)` is the library entry point (training start-up calls it): it returns a
`DataReport` whose `.fatal` problems stop training and whose `.warnings` (boxes clipped to the image,
empty boxes dropped, a VOC xml without <size>) do not.

Fast on COCO's train2017 (118k images, 860k boxes): annotation fields are read into numpy columns and
checked together, and each image folder is listed once (os.scandir) instead of one stat per file.
"""
from __future__ import annotations

import hydra
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig

from tasks.cli import CONFIG_DIR, run
from tasks.datasets.check import check_dataset
from tasks.errors import USER_ERRORS, user_errors_exit


@hydra.main(config_path=CONFIG_DIR, config_name="check_data", version_base="1.3")
@user_errors_exit
def main(cfg: DictConfig) -> None:
    if cfg.dataset.get("prepare") is not None:
        try:
            instantiate(cfg.dataset.prepare)
        except InstantiationException as err:  # Hydra's wrapper hides a user error's one sentence
            if isinstance(err.__cause__, USER_ERRORS):
                raise err.__cause__ from None
            raise
    report = check_dataset(cfg.dataset, decode_images=bool(cfg.decode), max_examples=int(cfg.max_examples))
    print(report.summary(), flush=True)
    report.raise_if_fatal()


def cli() -> None:
    """Console-script and `python -m` entry: a bad command line stops with one sentence."""
    run(main, "check_data")


if __name__ == "__main__":
    cli()
