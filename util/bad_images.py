"""Unreadable images: reported once by whichever process met them (DataLoader workers included), counted over
all ranks, and held to the --max_bad_images budget after each epoch."""
import glob
import json
import os
import re
import socket
import tempfile
import weakref
from typing import Dict, List

from util import distributed
from util.distributed import print0


class BadImageBudgetError(RuntimeError):
    """More unreadable images than --max_bad_images allows; the message is one line for the user."""


class BadImageLog:
    """Unreadable files reported by any process, collected in the main process.

    Reports are appended to a private temporary file, one JSON line each, not sent through a pipe: a pipe holds
    about 64 KiB, so a few hundred reports in one epoch would block the reporting process until the main
    process drains it after the epoch, which then never ends."""

    def __init__(self):
        remove_files_of_dead_processes()
        fd, self._path = tempfile.mkstemp(prefix=f'{report_file_prefix()}{os.getpid()}-', suffix='.jsonl')
        os.close(fd)
        self._bytes_read = 0
        self._reported_here = set()
        self.files: Dict[str, str] = {}  # path -> error, in the main process after collect()
        # forked workers share this object: only the creating process may delete the file
        weakref.finalize(self, _remove_if_owner, self._path, os.getpid())

    def __getstate__(self):  # what a spawned worker gets: where to write, nothing else
        return {'_path': self._path}

    def __setstate__(self, state):
        self._path, self._bytes_read, self._reported_here, self.files = state['_path'], 0, set(), {}

    def report(self, path: str, error: Exception):
        if path in self._reported_here:
            return
        self._reported_here.add(path)
        message = f'{type(error).__name__}: {error}'.splitlines()[0][:500]
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
                print(f'Unreadable image replaced by another sample: {path} ({error})', flush=True)
        return new

    def collect_all_ranks(self):
        """collect(), then take in every other rank's files (a collective: call it on every rank)."""
        self.collect()
        for blob in distributed.all_gather_bytes(json.dumps(self.files).encode()):
            self.files.update(json.loads(blob.decode()))

    def __len__(self):
        return len(self.files)


def check_budget(bad_images: BadImageLog, dataset_size: int, max_bad_images: float, output_dir: str) -> int:
    """After a training epoch: gather every rank's unreadable files; above --max_bad_images (a fraction of the
    dataset if < 1, else a count) write output_dir/bad_images.txt and raise BadImageBudgetError. Collective.
    Returns how many files were unreadable so far."""
    bad_images.collect_all_ranks()
    allowed = int(max_bad_images * dataset_size) if max_bad_images < 1 else int(max_bad_images)
    if len(bad_images) <= allowed:
        return len(bad_images)
    listing = os.path.join(output_dir, 'bad_images.txt') if output_dir else ''
    if listing and distributed.is_main_process():
        with open(listing, 'w', encoding='utf-8') as f:
            f.writelines(f'{path}\t{error}\n' for path, error in bad_images.files.items())
    shown = ', '.join(list(bad_images.files)[:5])
    raise BadImageBudgetError(f'{len(bad_images)} unreadable images, more than --max_bad_images allows '
                              f'({allowed}): {shown}{" ..." if len(bad_images) > 5 else ""}'
                              + (f' (full list in {listing})' if listing else '')
                              + '; repair or remove them, or raise --max_bad_images')


def report_after_evaluation(bad_images: BadImageLog) -> int:
    """Evaluation sets: unreadable images were replaced, so the accuracy covers other images; say how many."""
    bad_images.collect_all_ranks()
    if len(bad_images):
        print0(f'{len(bad_images)} unreadable images were replaced while evaluating')
    return len(bad_images)


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
