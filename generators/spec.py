"""The static description of one Conv3d layer that a generator bakes into code.

Shapes are baked per layer (as in Halide's apps/conv_layer): the generated function is
specialised to one input size, kernel, stride, padding and dilation, which lets the schedule pick
register tiles that fit exactly and lets LLVM fold every index computation. Only the batch is free.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np

Triple = tuple[int, int, int]


def _is_integer(value: Any) -> bool:
    """An integer of Python's or numpy's; not a truth value, not a float (4.5 cut to 4)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool | np.bool_)


def _triple(value: Sequence[int], what: str) -> Triple:
    items = tuple(value) if isinstance(value, Sequence | np.ndarray) else ()
    if len(items) != 3 or not all(_is_integer(v) for v in items):
        raise ValueError(f"{what} needs 3 integers (t, h, w), got {value!r}")
    return tuple(int(v) for v in items)  # type: ignore[return-value]


INT32_MAX = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class Conv3dSpec:
    """One Conv3d layer: activations are channels-innermost (N, T, H, W, C) in numpy order.

    ``pads_begin``/``pads_end`` follow ONNX (asymmetric padding is allowed). ``in_size`` is the
    (T, H, W) of the input the code is specialised for.
    """

    name: str
    in_channels: int
    out_channels: int
    in_size: Triple
    kernel: Triple
    stride: Triple = (1, 1, 1)
    dilation: Triple = (1, 1, 1)
    pads_begin: Triple = (0, 0, 0)
    pads_end: Triple = (0, 0, 0)
    has_bias: bool = True
    relu: bool = False

    def __post_init__(self) -> None:
        for field in ("in_size", "kernel", "stride", "dilation", "pads_begin", "pads_end"):
            object.__setattr__(self, field, _triple(getattr(self, field), field))
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise ValueError(f"layer name {self.name!r} is not a valid C identifier")
        for field in ("in_channels", "out_channels"):
            value = getattr(self, field)
            if not _is_integer(value):
                raise ValueError(f"{self.name}: {field} must be an integer, got {value!r}")
            object.__setattr__(self, field, int(value))  # numpy's: JSON takes Python's
        for field in ("has_bias", "relu"):  # "false" would be true
            value = getattr(self, field)
            if not isinstance(value, bool | np.bool_):
                raise ValueError(f"{self.name}: {field} must be true or false, got {value!r}")
            object.__setattr__(self, field, bool(value))
        if self.in_channels < 1 or self.out_channels < 1:
            raise ValueError(f"{self.name}: channel counts must be >= 1")
        if min(self.kernel) < 1 or min(self.stride) < 1 or min(self.dilation) < 1:
            raise ValueError(f"{self.name}: kernel, stride and dilation must be >= 1")
        if min(self.pads_begin) < 0 or min(self.pads_end) < 0:
            raise ValueError(f"{self.name}: negative padding is not supported")
        geometry = (*self.kernel, *self.stride, *self.dilation, *self.pads_begin, *self.pads_end)
        sides = zip(self.in_size, self.pads_begin, self.pads_end, strict=True)
        padded = [n + begin + end for n, begin, end in sides]
        if max(geometry) > INT32_MAX or self.in_channels * math.prod(padded) > INT32_MAX:
            # Halide indexes buffers in 32 bits: past it the generator failed in Halide or numpy.
            raise ValueError(
                f"{self.name}: kernel {self.kernel}, stride {self.stride}, dilation "
                f"{self.dilation}, padding {self.pads_begin}/{self.pads_end} on a "
                f"{self.in_channels} x {self.in_size} input: past 2^31 - 1 (a value, or the "
                "padded input's elements per clip), the most Halide's 32-bit indexing takes"
            )
        if min(self.out_size) < 1:
            raise ValueError(
                f"{self.name}: input {self.in_size} is too small for kernel {self.kernel} "
                f"with dilation {self.dilation} and padding {self.pads_begin}/{self.pads_end}"
            )
        if self.out_channels * math.prod(self.out_size) > INT32_MAX:
            raise ValueError(
                f"{self.name}: an output of {self.out_channels} x {self.out_size} holds more "
                "than 2^31 - 1 elements per clip, the most Halide's 32-bit indexing takes"
            )

    @property
    def out_size(self) -> Triple:
        sizes = []
        for i in range(3):
            span = self.dilation[i] * (self.kernel[i] - 1) + 1
            padded = self.in_size[i] + self.pads_begin[i] + self.pads_end[i]
            sizes.append((padded - span) // self.stride[i] + 1)
        return tuple(sizes)  # type: ignore[return-value]

    @property
    def kernel_volume(self) -> int:
        return self.kernel[0] * self.kernel[1] * self.kernel[2]

    @property
    def weight_shape(self) -> tuple[int, int, int, int, int]:
        """ONNX/torch order (M, N, Kd, Kh, Kw): what the public API takes."""
        return (self.out_channels, self.in_channels, *self.kernel)

    def input_shape(self) -> tuple[int, int, int, int, int]:
        """One clip's input, numpy (N, T, H, W, C)."""
        return (1, *self.in_size, self.in_channels)

    def output_shape(self) -> tuple[int, int, int, int, int]:
        """One clip's output, numpy (N, T, H, W, C)."""
        return (1, *self.out_size, self.out_channels)

    @property
    def has_padding(self) -> bool:
        return any(self.pads_begin) or any(self.pads_end)

    def macs(self) -> int:
        """Dense multiply-accumulates of one clip."""
        t, h, w = self.out_size
        return t * h * w * self.out_channels * self.in_channels * self.kernel_volume

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Conv3dSpec:
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if not isinstance(data, dict):
            raise ValueError(f"a layer spec is a JSON object of {sorted(fields)}, got {data!r}")
        unknown = sorted(set(data) - set(fields))
        required = {n for n, f in fields.items() if f.default is dataclasses.MISSING}
        missing = sorted(required - set(data))
        if unknown or missing:
            raise ValueError(
                f"a layer spec is a JSON object of {sorted(fields)}: "
                + "; ".join(
                    f"{what} {keys}"
                    for what, keys in (("unknown", unknown), ("missing", missing))
                    if keys
                )
            )
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> Conv3dSpec:
        if not text:
            raise ValueError("the generator needs its layer spec (GeneratorParam 'spec')")
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise ValueError(
                f"spec {text[:60]!r}: not JSON ({exc}); spec= takes the JSON text itself, "
                "not a file"
            ) from None
        return cls.from_dict(data)
