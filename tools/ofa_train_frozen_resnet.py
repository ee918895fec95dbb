"""Run OFA's train.py as it is, with the ResNet's convolution weights kept fixed.

OFA's `--freeze-resnet` only swaps its batch norms for frozen ones; the convolutions still train.
The parity fixtures (tools/record_ofa_vqa_grounding.sh) need them fixed at the exact values of
`tools/ofa_harness/interop_checkpoint.py init`, so that the committed file can leave them out. This
sets `requires_grad=False` on every 4-d parameter of OFA's `ResNet` when it is built, then hands the
command line to OFA's `train.py` (run from OFA's `run_scripts/<task>/`, as OFA's scripts do):

    python ofa_train_frozen_resnet.py -- DATA --task=refcoco ... --freeze-encoder-embedding ...
"""
import os
import runpy
import sys


def main():
    args = sys.argv[1:]
    args = args[1:] if args[:1] == ["--"] else args
    src = os.path.abspath(os.path.join(os.getcwd(), "..", ".."))
    sys.path.insert(0, src)

    from models.ofa import resnet

    original_init = resnet.ResNet.__init__

    def init_with_fixed_convolutions(self, *a, **kw):
        original_init(self, *a, **kw)
        for param in self.parameters():
            if param.dim() == 4:
                param.requires_grad_(False)

    resnet.ResNet.__init__ = init_with_fixed_convolutions
    sys.argv = [os.path.join(src, "train.py")] + args
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
