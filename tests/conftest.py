import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..', 'shared', 'data'))


def shared_file(*parts):
    """Path to a file in ../shared/data, or skip the test when the shared folder is not beside the repo."""
    path = os.path.join(SHARED, *parts)
    if not os.path.exists(path):
        pytest.skip(f'{path} not found: these tests need ../shared/data beside the repo')
    return path


def torchrun(script, args, nproc=2):
    """Run one of the repo's scripts under torchrun as nproc CPU processes (one thread each), failing the test with
    the end of its stderr if it fails."""
    import subprocess
    import sys
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    p = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}',
                        script, *args], cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]


@pytest.fixture(scope='session')
def char_data(tmp_path_factory):
    """Tiny Shakespeare prepared at char level (65 symbols), once per test session."""
    import prepare
    out = tmp_path_factory.mktemp('data') / 'shakespeare_char'
    prepare.main(['--dataset=shakespeare_char', f"--input={shared_file('tinyshakespeare.txt')}", f'--out_dir={out}'])
    return out
