"""How the KV cache stores its rows, really in that dtype so that the bytes are real.

Layouts (`cache_dtype`):
  "model"  every row in the model's dtype (fp32 or bf16): exactly the tensors the full forward computes.
  "fp8"    the release's layout. A K=V row or compressed entry of D channels keeps its D - r non-RoPE channels as
           float8_e4m3fn in tiles of 64 channels with one power-of-two scale per tile (float8_e8m0fnu, 1 byte),
           and its r RoPE channels in bf16: (D - r) + ceil((D - r) / 64) + 2 r bytes (V4-Flash: 448 + 7 + 128 =
           583; the release pads to 584). Indexer keys: all c_I channels float8_e4m3fn with one fp32 scale per
           key (c_I + 4 bytes: 132 at c_I = 128).
With "fp8" a row is rounded through the layout as it is written, and that rounded row is what attention reads,
for the token that wrote it too; so a prompt prefilled in chunks gives what one prefill gives, in every layout.

A `RowBuffer` holds rows [B, capacity, ...] in one layout, with zeros where nothing was written (masked-out rows
then multiply a probability of exactly 0 by a finite value). It grows by doubling when rows are appended.
"""

from __future__ import annotations

import math

import torch

CACHE_DTYPES = ("model", "fp8")
FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
SCALE_TILE = 64  # channels per power-of-two scale in the K=V layout


class RowLayout:
    """Encodes rows [..., D] into named stored parts and back. The base class: the model's dtype, unchanged."""

    def __init__(self, dim: int, dtype: torch.dtype) -> None:
        self.dim, self.dtype = dim, dtype  # dtype: what decode() returns (the model's compute dtype)

    def part_shapes(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return {"rows": ((self.dim,), self.dtype)}

    def encode(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"rows": rows.to(self.dtype)}

    def decode(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        return parts["rows"]

    @property
    def bytes_per_row(self) -> int:
        return sum(math.prod(shape) * torch.empty((), dtype=dtype).element_size()
                   for shape, dtype in self.part_shapes().values())

    def roundtrip(self, rows: torch.Tensor) -> torch.Tensor:
        """What reading back a written row gives (rows themselves in the model layout)."""
        return self.decode(self.encode(rows))


def _power_of_two_scale(amax: torch.Tensor) -> torch.Tensor:
    """The smallest power of two s with amax / s <= FP8_MAX (1 for all-zero tiles), fp32."""
    exponent = torch.ceil(torch.log2(amax.float().clamp_min(1e-30) / FP8_MAX))
    return torch.where(amax > 0, torch.exp2(exponent), torch.ones_like(exponent))


class Fp8RowLayout(RowLayout):
    """K=V rows and compressed entries: fp8 non-RoPE channels with a power-of-two scale per 64, bf16 RoPE tail."""

    def __init__(self, dim: int, rope_dim: int, dtype: torch.dtype) -> None:
        super().__init__(dim, dtype)
        self.rope_dim, self.nope_dim = rope_dim, dim - rope_dim
        self.tiles = -(-self.nope_dim // SCALE_TILE)

    def part_shapes(self):
        return {"nope": ((self.nope_dim,), FP8), "scale": ((self.tiles,), torch.float8_e8m0fnu),
                "rope": ((self.rope_dim,), torch.bfloat16)}

    def _tiled(self, nope: torch.Tensor) -> torch.Tensor:
        pad = self.tiles * SCALE_TILE - self.nope_dim
        return torch.nn.functional.pad(nope.float(), (0, pad)).unflatten(-1, (self.tiles, SCALE_TILE))

    def encode(self, rows):
        tiles = self._tiled(rows[..., : self.nope_dim])  # [..., tiles, 64]
        scale = _power_of_two_scale(tiles.abs().amax(-1))  # [..., tiles]
        nope = (tiles / scale[..., None]).flatten(-2)[..., : self.nope_dim].to(FP8)
        return {"nope": nope, "scale": scale.to(torch.float8_e8m0fnu),
                "rope": rows[..., self.nope_dim:].to(torch.bfloat16)}

    def decode(self, parts):
        tiles = self._tiled(parts["nope"])
        nope = (tiles * parts["scale"].float()[..., None]).flatten(-2)[..., : self.nope_dim]
        return torch.cat((nope, parts["rope"].float()), dim=-1).to(self.dtype)


class Fp8KeyLayout(RowLayout):
    """Indexer keys: every channel fp8 with one fp32 scale per key."""

    def part_shapes(self):
        return {"key": ((self.dim,), FP8), "scale": ((1,), torch.float32)}

    def encode(self, rows):
        amax = rows.float().abs().amax(-1, keepdim=True)
        scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
        return {"key": (rows.float() / scale).to(FP8), "scale": scale}

    def decode(self, parts):
        return (parts["key"].float() * parts["scale"]).to(self.dtype)


def kv_layout(cache_dtype: str, dim: int, rope_dim: int, dtype: torch.dtype) -> RowLayout:
    """The layout of K=V rows and compressed entries."""
    _check(cache_dtype)
    return Fp8RowLayout(dim, rope_dim, dtype) if cache_dtype == "fp8" else RowLayout(dim, dtype)


def index_key_layout(cache_dtype: str, dim: int, dtype: torch.dtype) -> RowLayout:
    """The layout of the lightning indexer's keys."""
    _check(cache_dtype)
    return Fp8KeyLayout(dim, dtype) if cache_dtype == "fp8" else RowLayout(dim, dtype)


def _check(cache_dtype: str) -> None:
    if cache_dtype not in CACHE_DTYPES:
        raise ValueError(f"cache_dtype={cache_dtype!r}: choose {' or '.join(CACHE_DTYPES)}")


def _bits(t: torch.Tensor) -> torch.Tensor:
    """fp8 tensors as uint8 for indexing (index_put / gather are not implemented for every fp8 dtype)."""
    return t.view(torch.uint8) if t.element_size() == 1 and t.dtype.is_floating_point else t


class RowBuffer:
    """Rows [B, capacity, D] stored in `layout`; rows are written at explicit per-sequence indices."""

    def __init__(self, layout: RowLayout, batch: int, capacity: int, device: torch.device, growable: bool) -> None:
        self.layout, self.growable = layout, growable
        self.parts = {name: torch.zeros(batch, capacity, *shape, dtype=dtype, device=device)
                      for name, (shape, dtype) in layout.part_shapes().items()}

    @property
    def capacity(self) -> int:
        return next(iter(self.parts.values())).shape[1]

    @property
    def batch(self) -> int:
        return next(iter(self.parts.values())).shape[0]

    def reserve(self, rows: int) -> None:
        """Make room for `rows` rows per sequence (doubling, so appending one row at a time stays cheap)."""
        if rows <= self.capacity:
            return
        if not self.growable:
            raise RuntimeError(f"RowBuffer: {rows} rows do not fit a fixed buffer of {self.capacity}")
        self._resize(max(rows, 2 * self.capacity))

    def _resize(self, capacity: int) -> None:
        for name, part in self.parts.items():
            grown = part.new_zeros(part.shape[0], capacity, *part.shape[2:])
            grown[:, : part.shape[1]] = part
            self.parts[name] = grown

    def write(self, rows: torch.Tensor, index: torch.Tensor, sequences: torch.Tensor | None = None) -> None:
        """rows [n, T, D] into row index[i, t] of sequence sequences[i] (default: all, n = B), encoded."""
        self.reserve(int(index.max()) + 1)
        if sequences is None:
            sequences = torch.arange(rows.shape[0], device=rows.device)
        for name, part in self.layout.encode(rows).items():
            _bits(self.parts[name])[sequences[:, None], index] = _bits(part)

    def read(self, rows: int | None = None, index: torch.Tensor | None = None) -> torch.Tensor:
        """The first `rows` rows of every sequence [B, rows, D], or the rows at index [B, T], decoded."""
        if index is not None:
            batch_ix = torch.arange(index.shape[0], device=index.device)[:, None]
            return self.layout.decode({name: _bits(part)[batch_ix, index].view(part.dtype)
                                       for name, part in self.parts.items()})
        return self.layout.decode({name: part[:, :rows] for name, part in self.parts.items()})

    def reserved_bytes(self) -> int:
        return sum(part.numel() * part.element_size() for part in self.parts.values())

    def held_bytes(self, rows_per_sequence: list[int]) -> int:
        """Bytes of the rows in use: sum over sequences of their row count, read off the stored tensors."""
        return self.layout.bytes_per_row * sum(rows_per_sequence)

    @staticmethod
    def stack(buffers: list[RowBuffer]) -> RowBuffer:
        """One batch from buffers of one sequence each (rows padded with zeros to the largest capacity)."""
        out = RowBuffer.__new__(RowBuffer)
        out.layout, out.growable = buffers[0].layout, buffers[0].growable
        capacity = max(b.capacity for b in buffers)
        for b in buffers:
            if b.capacity < capacity:
                b._resize(capacity)
        out.parts = {name: torch.cat([b.parts[name] for b in buffers]) for name in buffers[0].parts}
        return out
