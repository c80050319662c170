"""The data-set scan of paper Fig. 2: for every feature map of some layers, its k strongest activations over a
data set, each from a distinct image.

Per image and channel only the strongest activation counts (the paper's "top 9 activations across the
validation set", 9 distinct images): its value, the image index and its position (row, col; the first in
row-major order when a map has ties). Across images, entries are ordered by value, ties by the lower image
index. That order is total, so the selection is a pure function of the candidates: :func:`scan_shard` maps a
shard of the data to a partial :class:`TopK` and :func:`merge` combines partials of disjoint shards into
exactly the single-pass result, however the data was split. Memory grows with layers x channels x k, never
with the data set. :func:`scan` saves its partial result as it goes and resumes from it.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from . import artifacts
from .data.loader import batches, fetch
from .distributed import Group, gather
from .errors import ConvscopeError
from .forward import eval_mode, exact_float32, run_to_all
from .layers import census, site


@dataclass
class TopK:
    """Per layer: ``values`` (C, k) float32 (-inf where fewer than k images were seen), ``images`` (C, k) int64
    data-set indices (-1 where empty), ``positions`` (C, k, 2) int64 (row, col); fully connected layers have
    position (0, 0). ``seen`` counts the images scanned.

    Per class, as zennit-crp's statistics keep reference images per class: ``class_values`` (C, classes,
    class_k) and ``class_images`` (C, classes, class_k), each map's strongest activations among the images of
    each class (by the images' labels), ordered as above; empty when the scan kept none."""

    k: int
    values: dict[str, torch.Tensor]
    images: dict[str, torch.Tensor]
    positions: dict[str, torch.Tensor]
    seen: int = 0
    class_values: dict[str, torch.Tensor] = field(default_factory=dict)
    class_images: dict[str, torch.Tensor] = field(default_factory=dict)
    shards: list[list[int]] = field(default_factory=list)  # per rank of a distributed scan: first, end, scanned

    @property
    def layers(self) -> list[str]:
        return list(self.values)

    @property
    def class_k(self) -> int:
        """How many images per class each map keeps (0: the scan kept no per-class statistics)."""
        return next(iter(self.class_values.values())).shape[2] if self.class_values else 0


def _select(values: torch.Tensor, images: torch.Tensor, positions: torch.Tensor, k: int):
    """The first k candidates per channel by (value descending, image index ascending)."""
    by_index = images.argsort(dim=1, stable=True)
    values, images = values.gather(1, by_index), images.gather(1, by_index)
    positions = positions.gather(1, by_index[..., None].expand(-1, -1, 2))
    order = values.argsort(dim=1, descending=True, stable=True)[:, :k]
    return values.gather(1, order), images.gather(1, order), positions.gather(1, order[..., None].expand(-1, -1, 2))


def _select_ranked(values: torch.Tensor, images: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_select` without positions, over the last dimension of any shape."""
    by_index = images.argsort(dim=-1, stable=True)
    values, images = values.gather(-1, by_index), images.gather(-1, by_index)
    order = values.argsort(dim=-1, descending=True, stable=True)[..., :k]
    return values.gather(-1, order), images.gather(-1, order)


def class_top(best: torch.Tensor, labels: torch.Tensor, index: torch.Tensor, n_classes: int, k: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per map and class, the k strongest images of a batch among those of that class: ``best`` (C, N) the
    images' strongest activation per map, ``labels`` and ``index`` (N,) their classes and data-set indices.
    Values (C, n_classes, k) (-inf where a class has fewer images) and data-set indices (-1 there)."""
    c = best.shape[0]
    values = torch.full((c, n_classes, k), float("-inf"))
    images = torch.full((c, n_classes, k), -1, dtype=torch.long)
    best, labels, index = best.float().cpu(), labels.long().cpu(), index.long().cpu()
    for cls in labels.unique().tolist():
        if not 0 <= cls < n_classes:
            continue  # an image of no class the data names (label -1): in no class's statistics
        cols = torch.nonzero(labels == cls).flatten()
        v, i = _select_ranked(best[:, cols], index[cols].expand(c, -1), k)
        values[:, cls, :v.shape[1]], images[:, cls, :v.shape[1]] = v, i
    return values, images


def class_histogram(topk: TopK, layer: str) -> torch.Tensor:
    """(C, classes) counts: for each map, the classes of its ``class_k`` strongest images over the whole data
    set (the union of the per-class lists holds them all, so the count is exact)."""
    if layer not in topk.class_values:
        raise ConvscopeError(f"the scan kept no per-class statistics for {layer!r}: scan again with --class-k > 0")
    v, i = topk.class_values[layer], topk.class_images[layer]
    c, n_classes, k = v.shape
    cls = torch.arange(n_classes).view(1, n_classes, 1).expand(c, -1, k).reshape(c, -1)
    flat_v, flat_i = v.reshape(c, -1), i.reshape(c, -1)
    by_index = flat_i.argsort(dim=1, stable=True)
    flat_v, cls = flat_v.gather(1, by_index), cls.gather(1, by_index)
    order = flat_v.argsort(dim=1, descending=True, stable=True)[:, :k]
    top_cls = cls.gather(1, order)
    seen = flat_v.gather(1, order) > float("-inf")
    counts = torch.zeros(c, n_classes, dtype=torch.long)
    return counts.scatter_add_(1, top_cls, seen.long())


def empty(k: int, channels: dict[str, int]) -> TopK:
    """A TopK with no image seen yet."""
    return TopK(k, {n: torch.full((c, k), float("-inf")) for n, c in channels.items()},
                {n: torch.full((c, k), -1, dtype=torch.long) for n, c in channels.items()},
                {n: torch.zeros((c, k, 2), dtype=torch.long) for n, c in channels.items()})


def batch_top(act: torch.Tensor, k: int, index: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One batch's k strongest images per channel, from its layer output (N, C, H, W) or (N, C): values (C, k'),
    offsets into the batch (C, k') and positions (C, k', 2), k' = min(k, N). Each image counts with its strongest
    activation, the first maximum in row-major order on a tie (fully connected layers: position (0, 0)); images
    are ordered by value, then image index (``index``, the batch's data-set indices; default their offsets).

    One pass over the output takes each row's maximum; the maps' maxima come from those, and the position only
    for the k' winners: the row is the first whose maximum is the map's, the column the first in that row
    holding it (the first maximum in row-major order, found in (C, k', H) and (C, k', W) values rather than by
    an argmax over every map, which costs several passes)."""
    return _top(act, k, index)[:3]


def _top(act: torch.Tensor, k: int, index: torch.Tensor | None = None
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`batch_top`, and the maps' maxima (N, C) it found them from (for :func:`class_top`)."""
    act = act.detach().float()
    n, c = act.shape[:2]
    by_index = torch.arange(n) if index is None else index.cpu().argsort(stable=True)
    rows = _row_max(act) if act.dim() == 4 else None
    if rows is not None:
        maxima = rows.amax(2)
    else:  # (N, C), or (N, C, L): no positions
        maxima = act.amax(tuple(range(2, act.dim()))) if act.dim() > 2 else act
    best = maxima.T[:, by_index.to(act.device)]  # (C, N), images in index order
    order = best.argsort(dim=1, descending=True, stable=True)[:, :k]
    values, offsets = best.gather(1, order), by_index.to(order.device)[order]
    if rows is not None:
        channel = torch.arange(c, device=act.device)[:, None]
        row = _first(rows.transpose(0, 1)[channel, offsets], values)  # (C, k')
        col = _first(act.transpose(0, 1)[channel, offsets, row], values)
        positions = torch.stack([row, col], dim=-1)
    else:
        positions = torch.zeros(c, offsets.shape[1], 2, dtype=torch.long)
    return values.cpu(), offsets.cpu(), positions.cpu(), maxima


def _first(lines: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Index of the first entry of each line (..., L) equal to its value (...)."""
    return (lines == values[..., None]).to(torch.uint8).argmax(-1)


def _row_max(act: torch.Tensor) -> torch.Tensor:
    """(N, C, H): the maximum of each row of each map of (N, C, H, W), reduced where the memory lies (PyTorch
    reduces a channels-last tensor over W several times faster through its (N, H, W, C) view)."""
    if not act.is_contiguous() and act.is_contiguous(memory_format=torch.channels_last):
        return act.permute(0, 2, 3, 1).amax(2).transpose(1, 2)
    return act.amax(3)


def from_activations(activations: dict[str, torch.Tensor], index: torch.Tensor, k: int) -> TopK:
    """The partial TopK of one batch from its layer outputs (N, C, H, W) or (N, C)."""
    return from_batch_top({name: batch_top(act, k, index) for name, act in activations.items()}, index, k)


def from_batch_top(tops: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]], index: torch.Tensor,
                   k: int, classes: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> TopK:
    """The partial TopK of one batch from :func:`batch_top` of each layer; ``index``: the batch's image indices;
    ``classes``: each layer's :func:`class_top`, if kept."""
    out = empty(k, {})
    index = index.long()
    for name, (values, offsets, positions) in tops.items():
        v, i, p = _select(values, index[offsets], positions, k)
        out.values[name], out.images[name], out.positions[name] = _pad(v, i, p, k)
    for name, (v, i) in (classes or {}).items():
        out.class_values[name], out.class_images[name] = v, i
    out.seen = len(index)
    return out


def _pad(v, i, p, k):
    missing = k - v.shape[1]
    if missing <= 0:
        return v, i, p
    c = v.shape[0]
    return (torch.cat([v, torch.full((c, missing), float("-inf"))], 1),
            torch.cat([i, torch.full((c, missing), -1, dtype=torch.long)], 1),
            torch.cat([p, torch.zeros((c, missing, 2), dtype=torch.long)], 1))


def merge(parts: Iterable[TopK]) -> TopK:
    """Combine partial results of disjoint shards: equal to scanning all their images in one pass."""
    parts = list(parts)
    if not parts:
        raise ConvscopeError("nothing to merge: no partial scans given")
    k, layers = parts[0].k, parts[0].layers
    for p in parts[1:]:
        if p.k != k or p.layers != layers:
            raise ConvscopeError(f"cannot merge scans of different k or layers ({p.k}, {p.layers} vs {k}, {layers})")
    class_k = parts[0].class_k
    if any(p.class_k != class_k or list(p.class_values) != list(parts[0].class_values) for p in parts[1:]):
        raise ConvscopeError("cannot merge scans that kept different per-class statistics")
    out = empty(k, {})
    for name in layers:
        v, i, p = _select(torch.cat([q.values[name] for q in parts], 1), torch.cat([q.images[name] for q in parts], 1),
                          torch.cat([q.positions[name] for q in parts], 1), k)
        out.values[name], out.images[name], out.positions[name] = v, i, p
    for name in parts[0].class_values:
        out.class_values[name], out.class_images[name] = _select_ranked(
            torch.cat([q.class_values[name] for q in parts], -1), torch.cat([q.class_images[name] for q in parts], -1),
            class_k)
    out.seen = sum(p.seen for p in parts)
    return out


def _capture(model: nn.Module, modules: dict[str, nn.Module], x: torch.Tensor, k: int, index: torch.Tensor,
             labels: torch.Tensor | None = None, n_classes: int = 0, class_k: int = 0) -> tuple[dict, dict]:
    """Each layer's :func:`batch_top` (and :func:`class_top` when ``class_k``), reduced as the forward pass
    produces the layer."""
    def keep(act: torch.Tensor):
        *top, maxima = _top(act, k, index)
        return tuple(top), class_top(maxima.T.cpu(), labels, index, n_classes, class_k) if class_k else None

    kept = dict(zip(modules, run_to_all(model, list(modules.values()), x, keep=keep)))
    return {n: t for n, (t, _) in kept.items()}, {n: c for n, (_, c) in kept.items() if c is not None}


def _out_of_memory(e: RuntimeError) -> bool:
    """Whether ``e`` says an allocation failed (CUDA's OutOfMemoryError, or the CPU allocator's message)."""
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e) or "can't allocate memory" in str(e)


def _class_k(data, layers: Sequence[str], class_k: int) -> int:
    """``class_k`` where the data has labels and classes, else 0 (nothing to count per class)."""
    return class_k if class_k and getattr(data, "classes", None) and hasattr(data, "batch") else 0


def _check(data, layers: Sequence[str], k: int) -> None:
    if len(data) == 0:
        raise ConvscopeError("the data set is empty: nothing to scan")
    if k < 1:
        raise ConvscopeError(f"k must be at least 1, got {k}")
    if k > len(data):
        raise ConvscopeError(f"k={k} is larger than the data set ({len(data)} images): ask for at most {len(data)}")
    if not layers:
        raise ConvscopeError("no layers to scan")


def scan_shard(model: nn.Module, data, indices: torch.Tensor | Sequence[int], layers: Sequence[str], k: int = 9,
               batch_size: int = 128, progress: bool | None = False, class_k: int = 0, workers: int = 0) -> TopK:
    """Scan the images ``indices`` of ``data`` (an ImageSet or any data set of (image, label)): a partial TopK,
    with each map's top ``class_k`` per class of the data (by the images' labels) when ``class_k`` > 0.
    ``workers`` processes fetch (decode) the batches (:func:`convscope.data.loader.batches`)."""
    indices = torch.as_tensor(indices, dtype=torch.long)
    modules = {layer: site(model, layer) for layer in layers}
    device = next(model.parameters()).device
    class_k = _class_k(data, layers, class_k)
    n_classes = len(data.classes) if class_k else 0
    parts: list[TopK] = []
    channels_last = True  # until a model refuses it (a ``.view`` after a convolution): then row-major, as given
    with eval_mode(model), torch.inference_mode(), exact_float32():  # on CUDA as on the CPU: no TF32
        chunks = [indices[start:start + batch_size] for start in range(0, len(indices), batch_size)]
        for idx, (x, labels) in tqdm(zip(chunks, batches(data, chunks, workers)), total=len(chunks), desc="scan",
                                     disable=None if progress is None else not progress, unit="batch", leave=False):
            x = x.to(device)
            try:
                if channels_last and x.dim() == 4:  # channels-last convolutions and pools: 0.6-0.75 of the time
                    try:
                        tops, classes = _capture(model, modules, x.contiguous(memory_format=torch.channels_last), k,
                                                 idx, labels, n_classes, class_k)
                    except RuntimeError as e:
                        if _out_of_memory(e):
                            raise
                        # a model that refuses channels-last input (a ``.view`` after a convolution): row-major,
                        # which raises again if the error was the model's own
                        warnings.warn(f"the model refused channels-last input ({str(e).splitlines()[0][:200]}); "
                                      "scanning row-major, the same numbers somewhat slower", stacklevel=2)
                        channels_last = False
                if not channels_last or x.dim() != 4:
                    tops, classes = _capture(model, modules, x, k, idx, labels, n_classes, class_k)
            except RuntimeError as e:
                if not _out_of_memory(e):
                    raise
                raise ConvscopeError(
                    f"out of memory scanning {len(idx)} images at once on {device} ({str(e).splitlines()[0][:200]}): "
                    f"lower the batch size (--batch-size {max(1, len(idx) // 4)}), or scan fewer layers at a time "
                    "(--layers)") from None
            parts.append(from_batch_top(tops, idx, k, classes))
            if len(parts) == 8:  # bounded memory: fold partials as we go
                parts = [merge(parts)]
        return merge(parts) if parts else _empty_for(model, modules, data, k, n_classes, class_k)


def _empty_for(model, modules, data, k, n_classes: int = 0, class_k: int = 0) -> TopK:
    x, _ = fetch(data, torch.tensor([0]))
    with torch.inference_mode():
        tops, _ = _capture(model, modules, x.to(next(model.parameters()).device), k, torch.tensor([0]))
    out = empty(k, {n: values.shape[0] for n, (values, _, _) in tops.items()})
    if class_k:
        for n, (values, _, _) in tops.items():
            out.class_values[n] = torch.full((values.shape[0], n_classes, class_k), float("-inf"))
            out.class_images[n] = torch.full((values.shape[0], n_classes, class_k), -1, dtype=torch.long)
    return out


def scan_bytes(model: nn.Module, layers: Sequence[str], size: tuple[int, int]) -> int:
    """What one image of ``size`` costs the scan: the outputs of ``layers`` (held until their top-k are taken)
    and four times the largest output of any module (what a forward pass holds at once), from the census."""
    param = next(model.parameters(), None)
    element = param.element_size() if param is not None else 4
    infos = {i.name: i for i in census(model, size)}
    sizes = [math.prod(i.shape) for i in infos.values() if i.shape]
    held = sum(math.prod(infos[s.name].shape) for s in (site(model, layer) for layer in layers)
               if s.name in infos and infos[s.name].shape)
    return max(1, element * (held + 4 * max(sizes, default=0)))


def scan(model: nn.Module, data, layers: Sequence[str], k: int = 9, batch_size: int = 128,
         state_path: str | Path | None = None, save_every: int = 20, progress: bool | None = None,
         identity: dict | None = None, class_k: int = 0, group: Group | None = None, workers: int = 0) -> TopK:
    """Scan a whole data set. With ``state_path``, the partial result is saved every ``save_every`` batches and an
    interrupted scan resumes from it, ending with the same result as an uninterrupted one. ``identity`` (JSON
    values: which split, which model, say) joins the layers, k and sizes in the key a saved state must match; a
    state that does not match, or is damaged, is discarded with a warning and the scan starts over. ``class_k``:
    also keep each map's top ``class_k`` images per class (see :class:`TopK`). ``workers``: processes that decode
    the batches (an ImageFolder read from disk), the result the same.

    ``group`` (several processes, :mod:`convscope.distributed`): this process scans only its shard, saving its
    own state at ``state_path`` (one per rank), and every rank returns the merge of all shards, which is the
    single-pass result; ``shards`` records each rank's (first, end, images scanned)."""
    _check(data, layers, k)
    class_k = _class_k(data, layers, class_k)
    group = group or Group()
    n = len(data)
    shard = group.shard(n)
    chunk = batch_size * save_every
    done, partial = 0, None
    key = {"layers": list(layers), "k": k, "n": n, "batch_size": batch_size, "class_k": class_k, **(identity or {})}
    if group.world > 1:
        key.update(rank=group.rank, world=group.world, shard=[shard.start, shard.stop])
    if state_path is not None and Path(state_path).is_file():
        done, partial = _resume(Path(state_path), key, len(shard))
    bar = tqdm(total=len(shard), initial=done, disable=None if progress is None else not progress or not group.main,
               desc="scan", unit="img")
    while done < len(shard):
        stop = min(done + chunk, len(shard))
        part = scan_shard(model, data, torch.arange(shard.start + done, shard.start + stop), layers, k, batch_size,
                          class_k=class_k, workers=workers)
        partial = part if partial is None else merge([partial, part])
        done = stop
        bar.update(stop - bar.n)
        if state_path is not None:
            artifacts.save_torch(state_path, {"key": key, "done": done, "topk": _to_state(partial)})
    bar.close()
    if group.world == 1:
        return partial

    parts = gather(partial, group)  # a shard of no image (fewer images than ranks) sends None
    merged = merge([p for p in parts if p is not None])
    shards = [Group(r, group.world).shard(n) for r in range(group.world)]
    merged.shards = [[s.start, s.stop, p.seen if p is not None else 0] for s, p in zip(shards, parts)]
    return merged


def _resume(path: Path, key: dict, total: int) -> tuple[int, TopK | None]:
    """Where a saved scan left off: (images done, partial result); (0, None), with a warning saying why, for a
    state that is damaged or was left by another scan (another split, layer list, k, model or data): the scan
    then starts over rather than mix the two."""
    import warnings

    try:
        with warnings.catch_warnings():  # torch's own notes about the pickle protocol of a damaged file
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or "key" not in state:
            raise ValueError(f"a {type(state).__name__}, not a scan state")
        if state["key"] != key:
            differ = sorted(k for k in set(key) | set(state["key"]) if key.get(k) != state["key"].get(k))
            warnings.warn(f"{path} was left by another scan (it differs in {', '.join(differ)}); this scan starts "
                          "over", stacklevel=3)
            return 0, None
        done, partial = state["done"], _from_state(state["topk"])
        if isinstance(done, bool) or not isinstance(done, int) or not 0 < done <= total or partial.seen != done:
            raise ValueError(f"it says {done!r} images done")
        for name in key["layers"]:
            if partial.values[name].shape[1] != key["k"] or partial.images[name].shape != partial.values[name].shape:
                raise ValueError(f"layer {name!r} has the wrong shape")
        return done, partial
    except Exception as e:  # damaged, truncated, refused by weights_only, or of another shape: only a cache
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        warnings.warn(f"{path} is damaged ({type(e).__name__}: {first:.200}); the scan starts over", stacklevel=3)
        return 0, None


def _to_state(t: TopK) -> dict:
    return {"k": t.k, "seen": t.seen, "values": t.values, "images": t.images, "positions": t.positions,
            "class_values": t.class_values, "class_images": t.class_images}


def _from_state(d: dict) -> TopK:
    return TopK(d["k"], dict(d["values"]), dict(d["images"]), dict(d["positions"]), d["seen"],
                dict(d["class_values"]), dict(d["class_images"]))


def save_topk(path: str | Path, topk: TopK, meta: dict | None = None) -> Path:
    """Write a TopK as safetensors (tensors ``<layer>/values|images|positions``) with JSON metadata."""
    tensors = {}
    for name in topk.layers:
        tensors[f"{name}/values"] = topk.values[name]
        tensors[f"{name}/images"] = topk.images[name]
        tensors[f"{name}/positions"] = topk.positions[name]
        if name in topk.class_values:
            tensors[f"{name}/class_values"] = topk.class_values[name]
            tensors[f"{name}/class_images"] = topk.class_images[name]
    info = {"k": topk.k, "seen": topk.seen, "layers": topk.layers, **(meta or {})}
    return artifacts.save_safetensors(path, tensors, {"convscope_topk": json.dumps(info)})


def load_topk(path: str | Path) -> tuple[TopK, dict]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            info = json.loads((f.metadata() or {})["convscope_topk"])
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (OSError, KeyError, ValueError, SafetensorError) as e:
        raise ConvscopeError(f"{str(path)!r} is not a readable convscope scan ({e}); run `convscope scan` again") from e
    layers = info["layers"]
    try:
        topk = TopK(info["k"], {n: tensors[f"{n}/values"] for n in layers}, {n: tensors[f"{n}/images"] for n in layers},
                    {n: tensors[f"{n}/positions"] for n in layers}, info["seen"],
                    {n: tensors[f"{n}/class_values"] for n in layers if f"{n}/class_values" in tensors},
                    {n: tensors[f"{n}/class_images"] for n in layers if f"{n}/class_images" in tensors})
    except (KeyError, TypeError) as e:
        raise ConvscopeError(f"{str(path)!r} is not a readable convscope scan (it lacks {e}); run `convscope scan` "
                             "again") from e
    return topk, info
