"""Loop, Scan and If exports built from public code (torch.onnx), cached in
~/.cache/onnx-resync/exports (ONNX_RESYNC_EXPORTS overrides), for tests/test_loop_exports.py and
tools/coverage_report.py.

Each model reads x [T, B, 5]; T sets the trip count of its loops, so a check runs several T.

- torchscript_*: a torch.jit.script'ed module through the TorchScript exporter (opset 17), where
  Python loops and branches become Loop and If nodes:
  - lstm_cell_loop: torch.nn.LSTMCell over the steps (an LSTM node inside the Loop body), the zero
    initial state made by ConstantOfShape outside;
  - lstm_hand_loop: the same cell written by hand (Linear + chunk(4): Gemm, MatMul and Slices at
    bounds computed from Shape inside the body);
  - gru_list_loop: a hand GRU cell whose outputs are collected in a list and stacked (SequenceEmpty
    carried by the Loop, SequenceInsert in the body, ConcatFromSequence after);
  - nested_loop_if: a loop over the steps whose body runs a loop of T - t trips whose body branches
    on k % 2 (Loop > Loop > If);
  - loop_in_if: a loop run only when T > 2 (If > Loop).
- dynamo_scan_rnn: torch._higher_order_ops.scan through the dynamo exporter (a Scan node).
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import onnx

FEAT, HIDDEN = 5, 6


def cache_dir() -> Path:
    return Path(os.environ.get("ONNX_RESYNC_EXPORTS", Path.home() / ".cache" / "onnx-resync" / "exports"))


def _modules():
    import torch
    from typing import List

    class LstmCellLoop(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.hidden = HIDDEN  # (TorchScript reads no globals of a class made in a function)
            self.inp, self.cell = torch.nn.Linear(FEAT, 4), torch.nn.LSTMCell(4, HIDDEN)
            self.head = torch.nn.Linear(HIDDEN, 3)

        def forward(self, x):
            x = torch.relu(self.inp(x))
            h = torch.zeros(x.shape[1], self.hidden)
            c = torch.zeros(x.shape[1], self.hidden)
            for t in range(x.shape[0]):
                h, c = self.cell(x[t], (h, c))
            return self.head(h)

    class LstmHandLoop(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.hidden = HIDDEN  # (TorchScript reads no globals of a class made in a function)
            self.inp, self.head = torch.nn.Linear(FEAT, 4), torch.nn.Linear(HIDDEN, 3)
            self.ih, self.hh = torch.nn.Linear(4, 4 * HIDDEN), torch.nn.Linear(HIDDEN, 4 * HIDDEN, bias=False)

        def forward(self, x):
            x = torch.relu(self.inp(x))
            h = torch.zeros(x.shape[1], self.hidden)
            c = torch.zeros(x.shape[1], self.hidden)
            for t in range(x.shape[0]):
                i, f, g, o = (self.ih(x[t]) + self.hh(h)).chunk(4, 1)
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                h = torch.sigmoid(o) * torch.tanh(c)
            return self.head(h)

    class GruListLoop(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.hidden = HIDDEN  # (TorchScript reads no globals of a class made in a function)
            self.inp, self.head = torch.nn.Linear(FEAT, 4), torch.nn.Linear(HIDDEN, 3)
            self.ih, self.hh = torch.nn.Linear(4, 3 * HIDDEN), torch.nn.Linear(HIDDEN, 3 * HIDDEN)

        def forward(self, x):
            x = torch.relu(self.inp(x))
            h = torch.zeros(x.shape[1], self.hidden)
            outs: List[torch.Tensor] = []
            for t in range(x.shape[0]):
                r, z, n = self.ih(x[t]).chunk(3, 1)
                hr, hz, hn = self.hh(h).chunk(3, 1)
                r, z = torch.sigmoid(r + hr), torch.sigmoid(z + hz)
                h = (1 - z) * torch.tanh(n + r * hn) + z * h
                outs.append(h)
            return self.head(torch.stack(outs))

    class NestedLoopIf(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.hidden = HIDDEN  # (TorchScript reads no globals of a class made in a function)
            self.inp, self.head = torch.nn.Linear(FEAT, HIDDEN), torch.nn.Linear(HIDDEN, 3)
            self.a, self.b = torch.nn.Linear(HIDDEN, HIDDEN), torch.nn.Linear(HIDDEN, HIDDEN)

        def forward(self, x):
            h = torch.zeros(x.shape[1], self.hidden)
            for t in range(x.shape[0]):
                z = torch.relu(self.inp(x[t]))
                for k in range(x.shape[0] - t):
                    if k % 2 == 0:
                        z = torch.tanh(self.a(z))
                    else:
                        z = torch.sigmoid(self.b(z))
                h = h + z
            return self.head(h)

    class LoopInIf(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.hidden = HIDDEN  # (TorchScript reads no globals of a class made in a function)
            self.inp, self.a = torch.nn.Linear(FEAT, HIDDEN), torch.nn.Linear(HIDDEN, HIDDEN)
            self.head = torch.nn.Linear(HIDDEN, 3)

        def forward(self, x):
            z = torch.relu(self.inp(x[0]))
            if x.shape[0] > 2:
                for t in range(x.shape[0]):
                    z = torch.tanh(self.a(z) + z)
            else:
                z = torch.sigmoid(z)
            return self.head(z)

    class ScanRnn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.hidden = HIDDEN  # (TorchScript reads no globals of a class made in a function)
            self.inp, self.wh = torch.nn.Linear(FEAT, HIDDEN), torch.nn.Linear(HIDDEN, HIDDEN)
            self.head = torch.nn.Linear(HIDDEN, 3)

        def forward(self, x):
            from torch._higher_order_ops.scan import scan

            xs = torch.relu(self.inp(x))

            def step(h, xt):
                h2 = torch.tanh(self.wh(h) + xt)
                return h2, h2.clone()

            _, ys = scan(step, torch.zeros(x.shape[1], self.hidden), xs)
            return self.head(ys)

    return {"torchscript_lstm_cell_loop": LstmCellLoop, "torchscript_lstm_hand_loop": LstmHandLoop,
            "torchscript_gru_list_loop": GruListLoop, "torchscript_nested_loop_if": NestedLoopIf,
            "torchscript_loop_in_if": LoopInIf, "dynamo_scan_rnn": ScanRnn}


NAMES = ["torchscript_lstm_cell_loop", "torchscript_lstm_hand_loop", "torchscript_gru_list_loop",
         "torchscript_nested_loop_if", "torchscript_loop_in_if", "dynamo_scan_rnn"]


def build(name: str) -> onnx.ModelProto:
    """Export `name` (torch needed)."""
    import torch

    torch.manual_seed(0)
    module = _modules()[name]().eval()
    example = (torch.randn(3, 2, FEAT),)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if name.startswith("dynamo_"):
            dims = {"x": {0: torch.export.Dim("T", min=1), 1: torch.export.Dim("B")}}
            return torch.onnx.export(module, example, dynamo=True, verbose=False, dynamic_shapes=dims).model_proto
        buf = io.BytesIO()
        torch.onnx.export(torch.jit.script(module), example, buf, dynamo=False, opset_version=17, input_names=["x"],
                          dynamic_axes={"x": {0: "T", 1: "B"}})
    return onnx.load_from_string(buf.getvalue())


def export_path(name: str) -> Path:
    """The cached file of `name`, exported first where it is missing (raises where torch cannot)."""
    path = cache_dir() / f"{name}.onnx"
    if not path.exists():
        model = build(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        onnx.save(model, str(tmp))
        tmp.replace(path)
    return path
