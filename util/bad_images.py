"""Unreadable images (and images over --max_image_pixels): reported once by whichever process met them (DataLoader
workers included), counted over all ranks, and held to the --max_bad_images budget as soon as it is exceeded (at
the next point where the ranks agree: a logging window in training, every --print_freq batches in evaluation) and
at the end of each pass."""
import glob
import json
import os
import re
import socket
import tempfile
import weakref
from typing import Dict, List

from util import distributed
from util.images import ImageTooLarge, MetadataTooLarge, describe_error


class BadImageBudgetError(RuntimeError):
    """More unreadable images than --max_bad_images allows; the message is one line for the user."""


class BadImageLog:
    """Unreadable files reported by any process, collected in the main process.

    Reports are appended to a private temporary file, one JSON line each, not sent through a pipe: a pipe holds
    about 64 KiB, so a few hundred reports in one epoch would block the reporting process until the main
    process drains it after the epoch, which then never ends."""

    def __init__(self, action: str = 'replaced by another sample'):
        self.action = action  # what happens to such a sample, for the report line
        remove_files_of_dead_processes()
        fd, self._path = tempfile.mkstemp(prefix=f'{report_file_prefix()}{os.getpid()}-', suffix='.jsonl')
        os.close(fd)
        self._bytes_read = 0
        self._reported_here = set()
        self.files: Dict[str, str] = {}  # path -> error, in the main process after collect()
        # forked workers share this object: only the creating process may delete the file
        weakref.finalize(self, _remove_if_owner, self._path, os.getpid())

    def __getstate__(self):  # what a spawned worker gets: where to write, nothing else
        return {'_path': self._path, 'action': self.action}

    def __setstate__(self, state):
        self._path, self.action = state['_path'], state['action']
        self._bytes_read, self._reported_here, self.files = 0, set(), {}

    def report(self, path: str, error: Exception):
        if path in self._reported_here:
            return
        self._reported_here.add(path)
        message = describe_error(error)[:500]
        line = (json.dumps([path, message]) + '\n').encode()
        # one O_APPEND write per report, so lines from concurrent workers do not interleave
        fd = os.open(self._path, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)

    def collect(self) -> List[str]:
        """Read new reports; print each new file once. Returns the newly seen paths."""
        with open(self._path, 'rb') as f:
            f.seek(self._bytes_read)
            chunk = f.read()
        complete = chunk[:chunk.rfind(b'\n') + 1]  # a line still being written waits for the next call
        self._bytes_read += len(complete)
        new = []
        for line in complete.decode().splitlines():
            path, error = json.loads(line)
            if path not in self.files:
                self.files[path] = error
                new.append(path)
                print(f'Image {self.action}: {path} ({error})', flush=True)
        return new

    def collect_all_ranks(self):
        """collect(), then take in every other rank's files (a collective: call it on every rank)."""
        self.collect()
        for blob in distributed.all_gather_bytes(json.dumps(self.files).encode()):
            self.files.update(json.loads(blob.decode()))

    def __len__(self):
        return len(self.files)


class BadImageBudget:
    """--max_bad_images for one dataset: a fraction of it if < 1, else a count of files."""

    def __init__(self, bad_images: BadImageLog, dataset_size: int, max_bad_images: float, output_dir: str):
        self.bad_images = bad_images
        self.allowed = int(max_bad_images * dataset_size) if max_bad_images < 1 else int(max_bad_images)
        self.output_dir = output_dir

    def local_count(self) -> int:
        """Files this process has met so far (its workers' reports read now); no collective."""
        self.bad_images.collect()
        return len(self.bad_images)

    def check_if_over(self, summed_local_counts: float):
        """At a point where every rank agrees: the local counts summed over ranks can only overcount (one file met
        on two ranks), so only a sum above the budget costs the exact count (a collective, on every rank alike)."""
        if summed_local_counts > self.allowed:
            self.check()

    def check(self) -> int:
        """Gather every rank's files; above the budget write output_dir/bad_images.txt and raise
        BadImageBudgetError. Collective. Returns how many files were unusable so far."""
        self.bad_images.collect_all_ranks()
        files = self.bad_images.files
        if len(files) <= self.allowed:
            return len(files)
        listing = os.path.join(self.output_dir, 'bad_images.txt') if self.output_dir else ''
        if listing and distributed.is_main_process():
            with open(listing, 'w', encoding='utf-8') as f:
                f.writelines(f'{path}\t{error}\n' for path, error in files.items())
        shown = ', '.join(list(files)[:5])
        too_large = sum(error.startswith(ImageTooLarge.__name__) for error in files.values())
        big_metadata = sum(error.startswith(MetadataTooLarge.__name__) for error in files.values())
        advice = '; repair or remove them, or raise --max_bad_images' if too_large + big_metadata < len(files) else ''
        if too_large:
            advice += (f'; {too_large} of them are not damaged but larger than --max_image_pixels allows (pass '
                       '--max_image_pixels 0 to read them)')
        if big_metadata:
            advice += (f"; {big_metadata} of them are not damaged but carry PNG metadata over Pillow's limit (strip "
                       'it, e.g. mogrify -strip)')
        raise BadImageBudgetError(f'{len(files)} unreadable image{"s" if len(files) > 1 else ""}, more than '
                                  f'--max_bad_images allows '
                                  f'({self.allowed}): {shown}{" ..." if len(files) > 5 else ""}'
                                  + (f' (full list in {listing})' if listing else '') + advice)


def report_file_prefix() -> str:
    return f'mae-bad-images-{socket.gethostname()}-'


def remove_files_of_dead_processes():
    """Report files of processes on this host that were killed (SIGKILL runs no clean-up) are removed."""
    pattern = re.compile(re.escape(report_file_prefix()) + r'(\d+)-\w+\.jsonl$')
    for path in glob.glob(os.path.join(glob.escape(tempfile.gettempdir()), report_file_prefix() + '*.jsonl')):
        match = pattern.search(os.path.basename(path))
        if match and not process_alive(int(match.group(1))):
            remove_quietly(path)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _remove_if_owner(path: str, owner_pid: int):
    if os.getpid() == owner_pid:
        remove_quietly(path)


def remove_quietly(path: str):
    try:
        os.remove(path)
    except OSError:
        pass
