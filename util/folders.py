"""Walking image folders: which entries are classes and images. One rule for every path that walks a folder (the
datasets, the class lists, main_infer.py's folder mode), so that they agree on what is data.

- Hidden entries (a name starting with '.': `.thumbnails/`, `.ipynb_checkpoints/`, macOS's `._photo.jpg`) and the
  metadata other systems leave beside images (`__MACOSX/`, Synology's `@eaDir/`, `Thumbs.db`, `desktop.ini`, ...)
  are neither classes nor images, at any depth.
- Images are the files with torchvision's ImageFolder extensions (and .gif), found as torchvision finds them
  (sub-folders walked, samples in its order), so ImageNet gives the official samples in the official order.
- Links are followed, as torchvision does, to folders and to files alike; a folder reached twice (a link back to
  an ancestor) is walked once. A link to a missing file is listed like any image: reading it then fails, and the
  file is reported as unreadable instead of being dropped unseen.
"""
import os
from typing import Dict, List, Tuple

from torchvision.datasets.folder import IMG_EXTENSIONS as TORCHVISION_EXTENSIONS

# torchvision's ImageFolder extensions, and GIF (decoded by its first frame), which torchvision leaves out
IMG_EXTENSIONS = TORCHVISION_EXTENSIONS + ('.gif',)
# what a run that reads arrays (util/arrays.py) lists: .npy too (never listed otherwise: a depth map or feature
# file kept beside RGB photos is not one of them)
ARRAY_IMG_EXTENSIONS = IMG_EXTENSIONS + ('.npy',)
# names (lower case) that file managers, archivers, NAS boxes and file systems leave beside data
METADATA_NAMES = frozenset({'__macosx', '@eadir', 'thumbs.db', 'ehthumbs.db', 'desktop.ini', '$recycle.bin',
                            'system volume information', 'lost+found', 'icon\r'})


def is_data_name(name: str) -> bool:
    """False for hidden entries and metadata (module docstring): they are skipped wherever folders are walked."""
    return not name.startswith('.') and name.lower() not in METADATA_NAMES


def class_folders(root: str) -> Tuple[List[str], List[str]]:
    """(the class folders of an ImageFolder root, sorted as torchvision sorts them; the skipped entry names that
    would have been folders). Links to folders count as folders. ([], []) if root is missing."""
    if not os.path.isdir(root):
        return [], []
    folders = [entry.name for entry in os.scandir(root) if entry.is_dir()]
    return sorted(n for n in folders if is_data_name(n)), sorted(n for n in folders if not is_data_name(n))


def image_files(folder: str, extensions: Tuple[str, ...] = IMG_EXTENSIONS) -> Tuple[List[str], List[str]]:
    """(the image files under `folder`, in torchvision's make_dataset order: the walked folders sorted by path,
    each one's files sorted; the paths of the hidden and metadata entries skipped on the way)."""
    found, skipped, seen = [], [], set()
    for path, names in sorted(walk(folder, skipped, seen)):
        found += [os.path.join(path, n) for n in sorted(names) if n.lower().endswith(extensions)]
    return found, skipped


def walk(folder: str, skipped: List[str], seen: set):
    """(folder path, file names) for `folder` and every data folder below it, links followed, each real folder
    once; hidden and metadata entries are appended to `skipped` and not entered."""
    real = os.path.realpath(folder)
    if real in seen:
        return
    seen.add(real)
    try:
        entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
    except OSError:
        return  # unreadable: as os.walk does, nothing below it is listed
    files = []
    for entry in entries:
        if not is_data_name(entry.name):
            skipped.append(entry.path)
        elif entry.is_dir():
            yield from walk(entry.path, skipped, seen)
        else:
            files.append(entry.name)
    yield folder, files


def describe_skipped(root: str, skipped: List[str]) -> str:
    """'' or one line for the run's output: what under root was not taken for data."""
    if not skipped:
        return ''
    names = list(dict.fromkeys(os.path.basename(p) for p in skipped))  # in the order met: folders of root first
    shown = ', '.join(names[:6]) + (f' (+{len(names) - 6} more names)' if len(names) > 6 else '')
    return (f'Note: {root}: {len(skipped)} hidden or metadata entr{"ies" if len(skipped) > 1 else "y"} skipped, not '
            f'data ({shown})')


def collect_images(paths: List[str]) -> Tuple[List[str], List[Dict[str, str]], List[str]]:
    """main_infer.py's inputs: files as given, folders expanded by the rule above (image_files). Returns (image
    files, errors for missing paths and folders without images, skipped hidden and metadata entries)."""
    files, errors, skipped = [], [], []
    for path in paths:
        if os.path.isdir(path):
            found, hidden = image_files(path)
            skipped += hidden
            if not found:
                errors.append({'image': path, 'error': 'folder holds no image files'})
            files.extend(found)
        elif os.path.isfile(path):
            files.append(path)
        else:
            errors.append({'image': path, 'error': 'no such file or folder'})
    return files, errors, skipped
