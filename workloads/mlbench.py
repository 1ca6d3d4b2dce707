"""The ``ml-inference`` workload's measuring process: ``python -m workloads.mlbench``.

It runs in its own process (in the guest, started by the agent like any guest command), so
that torch - hundreds of MB, threads of its own - never loads into the agent. It builds one
model from a small config with random weights (seeded: nothing is downloaded, ever), runs
inference on random inputs for ``--seconds`` after one untimed batch, and prints one JSON
line::

    {"model": "bert", "batches": 41, "batch": 8, "samples_per_s": 163.2,
     "latency_ms_median": 48.9, "latency_ms_p99": 57.0, "threads": 2, "torch": "2.13.0+cpu"}

The two models, both the shapes of the study's pair at a size a small VM runs:

``bert``
    a BERT-style encoder: token + position embeddings, ``layers`` transformer encoder
    layers (``hidden`` wide, ``heads`` heads, a 4x feed-forward, GELU, post-norm as BERT)
    over ``seq_len`` tokens of a 30522-token vocabulary, then BERT's pooler (first token,
    dense, tanh) and a 2-way classifier;
``alexnet``
    an AlexNet-style CNN (Krizhevsky et al. 2012, as torchvision lays it out): five
    convolutions 64-192-384-256-256 with ReLU and three max-pools, adaptive pooling to
    6x6, then dropout + 4096 + 4096 + 1000 fully connected layers, on ``image_size``
    square RGB images.

Latency is per batch (one forward pass under ``torch.inference_mode``); throughput is the
samples of all timed batches over their total time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

VOCAB = 30522  # BERT's WordPiece vocabulary size


def build_bert(hidden: int, layers: int, heads: int, seq_len: int) -> Any:
    import torch
    from torch import nn

    class Bert(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tokens = nn.Embedding(VOCAB, hidden)
            self.positions = nn.Embedding(seq_len, hidden)
            self.norm = nn.LayerNorm(hidden)
            layer = nn.TransformerEncoderLayer(
                hidden, heads, 4 * hidden, dropout=0.1, activation="gelu", batch_first=True
            )
            self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
            self.pooler = nn.Linear(hidden, hidden)
            self.classifier = nn.Linear(hidden, 2)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            positions = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
            x = self.norm(self.tokens(ids) + self.positions(positions))
            x = self.encoder(x)
            logits: torch.Tensor = self.classifier(torch.tanh(self.pooler(x[:, 0])))
            return logits

    return Bert()


def build_alexnet() -> Any:
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(64, 192, kernel_size=5, padding=2),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(192, 384, kernel_size=3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(384, 256, kernel_size=3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(256, 256, kernel_size=3, padding=1),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.AdaptiveAvgPool2d((6, 6)),
        nn.Flatten(),
        nn.Dropout(),
        nn.Linear(256 * 6 * 6, 4096),
        nn.ReLU(inplace=True),
        nn.Dropout(),
        nn.Linear(4096, 4096),
        nn.ReLU(inplace=True),
        nn.Linear(4096, 1000),
    )


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model == "bert":
        model = build_bert(args.hidden, args.layers, args.heads, args.seq_len)
        inputs = torch.randint(0, VOCAB, (args.batch, args.seq_len))
    else:
        model = build_alexnet()
        inputs = torch.rand(args.batch, 3, args.image_size, args.image_size)
    model.eval()
    latencies: list[float] = []
    with torch.inference_mode():
        model(inputs)  # untimed: allocations, lazy initialisation
        deadline = time.perf_counter() + args.seconds
        while not latencies or time.perf_counter() < deadline:
            start = time.perf_counter()
            model(inputs)
            latencies.append(time.perf_counter() - start)
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, max(0, round(0.99 * len(ordered)) - 1))]
    return {
        "model": args.model,
        "batches": len(latencies),
        "batch": args.batch,
        "samples_per_s": args.batch * len(latencies) / sum(latencies),
        "latency_ms_median": statistics.median(latencies) * 1e3,
        "latency_ms_p99": p99 * 1e3,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m workloads.mlbench", description=__doc__)
    parser.add_argument("--model", choices=("bert", "alexnet"), required=True)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=0, help="0: torch's default")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=224)
    print(json.dumps(measure(parser.parse_args())), flush=True)


if __name__ == "__main__":
    main()
