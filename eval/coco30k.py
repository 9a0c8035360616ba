#!/usr/bin/env python
"""COCO-30K FID and CLIP score of a pipeline: ``stepdistill coco30k`` (stepdistill/evaluation/coco30k.py).

    accelerate launch eval/coco30k.py --pipeline exported/my-student --out runs/coco30k ...
"""

import sys

from stepdistill.cli import main

if __name__ == "__main__":
    sys.exit(main(["coco30k", *sys.argv[1:]]))
