import os

for k, v in {"OMP_THREAD_LIMIT": "1", "ORT_DISABLE_TELEMETRY": "1", "HF_HUB_OFFLINE": "1",
             "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(k, v)

import torch  # noqa: E402

torch.set_num_threads(1)
