"""Dataset load time: first load (decode every JPEG into the cache) vs a second load (from the cache).

    .venv/bin/python bench/data_load.py --data-dir ../shared/data/cifar10-jpeg

Target (core issue): the second load of the 60k JPEGs takes under 3 s. The cache directory is a fresh
temporary one, so the first load really decodes.
"""

import argparse
import json
import tempfile
import time

from kdsearch.config import DataConfig
from kdsearch.data.datasets import load_splits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="../shared/data/cifar10-jpeg")
    parser.add_argument("--repeats", type=int, default=3, help="cached loads to time")
    args = parser.parse_args()
    config = DataConfig(dataset="folder", data_dir=args.data_dir, label="CIFAR-10 (JPEG q75 copy)")
    with tempfile.TemporaryDirectory() as cache:
        start = time.perf_counter()
        splits = load_splits(config, cache)
        first = time.perf_counter() - start
        cached = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            load_splits(config, cache)
            cached.append(time.perf_counter() - start)
    images = sum(splits.sizes().values())
    print(f"dataset: {splits.label}, {images} images {splits.sizes()}")
    print(f"first load (decode + cache write): {first:.2f} s")
    print(f"cached load: best {min(cached):.2f} s, worst {max(cached):.2f} s over {args.repeats}")
    print(
        f"speed-up of a cached load: {first / min(cached):.1f}x; target < 3 s: {'met' if max(cached) < 3 else 'NOT met'}"
    )
    print(json.dumps({"images": images, "first_s": first, "cached_s": cached}))


if __name__ == "__main__":
    main()
