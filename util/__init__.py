"""Library code of the MAE scripts.

Imported before torch by every script: it turns off torch's automatic loading of device plugins
(TORCH_DEVICE_BACKEND_AUTOLOAD=0, unless the user set it). With it on, an installed plugin that cannot load, such
as torch_npu without the CANN libraries (the usual Ascend set-up mistake), makes `import torch` itself fail, for
every device, `--help` included. util/device.py imports the plugin when its device is asked for, and says in one
line what is missing and what to do.
"""
import os

os.environ.setdefault('TORCH_DEVICE_BACKEND_AUTOLOAD', '0')
