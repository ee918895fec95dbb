"""Small, exactly re-creatable files for the interop checkpoints (tools/ofa_harness/train_interop.sh).

A checkpoint of OFA's shape is mostly its token embeddings (59,457 x d, shared with the output
projection) and its ResNet: tens of MB even at d=32. The interop checkpoints keep those fixed
during training (`--freeze-encoder-embedding --freeze-decoder-embedding --freeze-resnet-weights`)
at values every machine computes exactly: small integers from numpy's legacy `RandomState` (its
stream is frozen by numpy's compatibility policy) times a power of two, so float32 holds them
exactly. The relative-position bucket buffers are integer tables of the model's options. So the
committed file holds everything else (about 0.6 MB), and `rebuild` puts the rest back; the digest
of the model's tensors says the rebuilt checkpoint is the one OFA's evaluate.py read.

    python interop_checkpoint.py init BASE.pt INIT.pt     # a start whose fixed tensors are exact
    python interop_checkpoint.py strip FULL.pt SMALL.pt   # what to commit
    python interop_checkpoint.py rebuild SMALL.pt FULL.pt
"""
import argparse
import hashlib
import math
import sys
import zlib

import numpy as np
import torch


def is_fixed(name: str, tensor: torch.Tensor) -> bool:
    """Tensors kept fixed in training (and left out of the committed file)."""
    return (name.endswith("embed_tokens.weight") or name.endswith("output_projection.weight")
            or (".embed_images." in f".{name}" and tensor.dim() == 4))  # ResNet convolution weights


def is_bucket_table(name: str) -> bool:
    return name.endswith("_rp_bucket")


def exact_values(name: str, shape) -> torch.Tensor:
    """Integers in [-127, 127] times 2^-e (a scale near OFA's init: d^-1/2 for embeddings, He for
    convolutions), seeded by the tensor's name; exact in float32 on any machine."""
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else int(shape[0])
    std = math.sqrt(2.0 / fan_in) if len(shape) == 4 else shape[1] ** -0.5
    exponent = round(math.log2(73.0 / std))  # integers uniform in [-127, 127] have std ~73
    rng = np.random.RandomState(zlib.crc32(name.encode()) & 0x7FFFFFFF)
    ints = rng.randint(-127, 128, size=tuple(shape)).astype(np.float64)
    return torch.from_numpy((ints * 2.0 ** -exponent).astype(np.float32))


def model_options(state) -> dict:
    model = state["cfg"]["model"]
    return dict(model) if hasattr(model, "items") else dict(vars(model))


def bucket_table(name: str, options: dict) -> torch.Tensor:
    from mue_fairseq.ofa.position import image_relative_buckets, token_relative_buckets

    if name.endswith("image_rp_bucket"):
        return image_relative_buckets(options["image_bucket_size"])
    return token_relative_buckets(options["token_bucket_size"])


def weights_digest(model_state: dict) -> str:
    """sha256 over the names, dtypes, shapes and bytes of every tensor, in name order."""
    digest = hashlib.sha256()
    for name in sorted(model_state):
        tensor = model_state[name].detach().contiguous().cpu()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def load(path: str) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def make_init(base: str, out: str) -> None:
    state = load(base)
    model = state["model"]
    shared = {}
    for name, tensor in model.items():
        if is_fixed(name, tensor):
            key = tensor.data_ptr()  # tied embeddings stay one tensor
            shared.setdefault(key, exact_values("embed_tokens" if tensor.dim() == 2 else name, tensor.shape))
            model[name] = shared[key]
    torch.save(state, out)


def strip(full: str, out: str) -> str:
    state = load(full)
    digest = weights_digest(state["model"])
    state["model"] = {k: v for k, v in state["model"].items() if not (is_fixed(k, v) or is_bucket_table(k))}
    state["last_optimizer_state"] = None
    state["interop_weights_digest"] = digest
    state["interop_fixed"] = {k: list(v.shape) for k, v in load(full)["model"].items() if is_fixed(k, v)}
    torch.save(state, out)
    return digest


def rebuild(small: str, out: str) -> str:
    """Write the full checkpoint back; returns its weights digest (checked against the recorded one)."""
    state = load(small)
    options = model_options(state)
    fixed = state.pop("interop_fixed")
    recorded = state.pop("interop_weights_digest")
    embeddings = None
    for name, shape in fixed.items():
        if len(shape) == 2:
            embeddings = embeddings if embeddings is not None else exact_values("embed_tokens", shape)
            state["model"][name] = embeddings
        else:
            state["model"][name] = exact_values(name, shape)
    for prefix in ("encoder", "decoder"):
        for kind in ("token", "image"):
            name = f"{prefix}.{kind}_rp_bucket"
            state["model"][name] = bucket_table(name, options)
    state["model"] = dict(sorted(state["model"].items()))
    digest = weights_digest(state["model"])
    if digest != recorded:
        raise ValueError(f"{small}: the rebuilt weights differ from those recorded ({digest} != {recorded})")
    torch.save(state, out)
    return digest


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["init", "strip", "rebuild"])
    parser.add_argument("source")
    parser.add_argument("out")
    args = parser.parse_args(argv)
    result = {"init": make_init, "strip": strip, "rebuild": rebuild}[args.action](args.source, args.out)
    if result:
        print(result)


if __name__ == "__main__":
    sys.exit(main())
