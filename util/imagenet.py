"""ImageNet-1k's classes under their three kinds of name: synsets (n01440764; the folder names of the official
archive, in the standard class order), short readable names (tench) and WordNet lemmas (tench, Tinca tinca; the
ClassLabel names of the hub's ILSVRC/imagenet-1k and timm's ImageNetInfo descriptions), all in the same order, and
the class index ('0' ... '999', a shard's .cls). util/shards.py and util/datasets.py use them so that one ImageNet
class is one class whichever way a dataset names it."""
import functools
import os
from typing import Dict, List, Optional, Sequence, Tuple

UTIL = os.path.dirname(os.path.abspath(__file__))
IMAGENET_SYNSETS = os.path.join(UTIL, 'imagenet_synsets.txt')  # n01440764 ... in the standard class order
IMAGENET_NAMES = os.path.join(UTIL, 'imagenet_classes.txt')  # tench ... readable names in the same order
# 'tench, Tinca tinca' ...: WordNet lemmas in the same order, the ClassLabel names of the hub's ILSVRC/imagenet-1k
# and the descriptions of timm's ImageNetInfo
IMAGENET_LEMMAS = os.path.join(UTIL, 'imagenet_lemmas.txt')
DUPLICATE_NAMES = (134, 517)  # both 'crane' (the bird, the machine)


def read_lines(path: str) -> List[str]:
    with open(path, encoding='utf-8') as f:
        return [line.strip() for line in f if line.strip()]


def imagenet_synsets() -> List[str]:
    return read_lines(IMAGENET_SYNSETS)


def imagenet_names() -> List[str]:
    return read_lines(IMAGENET_NAMES)


@functools.lru_cache(maxsize=1)
def imagenet_tables() -> Tuple[Tuple[str, ...], Tuple[str, ...], Tuple[str, ...], Dict[str, int]]:
    """(synsets, short names, lemmas, {a short name or lemma that one class alone has: its index}); 'crane', the
    name of two classes, is in none."""
    synsets, names, lemmas = (tuple(read_lines(p)) for p in (IMAGENET_SYNSETS, IMAGENET_NAMES, IMAGENET_LEMMAS))
    owners: Dict[str, set] = {}
    for i, (name, lemma) in enumerate(zip(names, lemmas)):
        owners.setdefault(name, set()).add(i)
        owners.setdefault(lemma, set()).add(i)
    return synsets, names, lemmas, {name: min(ids) for name, ids in owners.items() if len(ids) == 1}


def imagenet_synset_of(name: str, index: Optional[int] = None) -> Optional[str]:
    """The ImageNet-1k synset a readable class name stands for ('tench' or 'tench, Tinca tinca' -> n01440764), or
    None when it is no ImageNet-1k name. With the sample's class `index` (a shard's .cls, a Parquet label), the name
    must be that class's: a dataset that merely shares a name with ImageNet keeps its own names."""
    synsets, names, lemmas, unique = imagenet_tables()
    if index is not None:
        # 'crane2': the hub's ClassLabel names must be unique, so its second 'crane' (class 517) carries a number
        bare = name.rstrip('0123456789') if index in DUPLICATE_NAMES else name
        return synsets[index] if 0 <= index < len(synsets) and bare in (names[index], lemmas[index]) else None
    return synsets[unique[name]] if name in unique else None


def imagenet_aliases(found: Sequence[str], run_classes: Sequence[str], found_are_indices: bool) -> Dict[str, str]:
    """{a found name: the run's name for the same class} where a split names ImageNet-1k classes by their index
    ('0' ... '999': shards with only .cls; found_are_indices says the names are such indices, not folder names
    that happen to be digits) and the run by synset, or the split by synset and the run by index; {} otherwise."""
    synsets = imagenet_synsets()
    if found_are_indices and set(run_classes) == set(synsets) and all(int(n) < 1000 for n in found):
        return {name: synsets[int(name)] for name in found}
    if set(run_classes) == {str(i) for i in range(1000)} and set(found) <= set(synsets):
        position = {synset: str(i) for i, synset in enumerate(synsets)}
        return {name: position[name] for name in found}
    return {}
