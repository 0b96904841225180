import os

import pytest

SHARED = os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..', 'shared', 'data'))


def shared_file(*parts):
    """Path to a file in ../shared/data, or skip the test when the shared folder is not beside the repo."""
    path = os.path.join(SHARED, *parts)
    if not os.path.exists(path):
        pytest.skip(f'{path} not found: these tests need ../shared/data beside the repo')
    return path


@pytest.fixture(scope='session')
def char_data(tmp_path_factory):
    """Tiny Shakespeare prepared at char level (65 symbols), once per test session."""
    import prepare
    out = tmp_path_factory.mktemp('data') / 'shakespeare_char'
    prepare.main(['--dataset=shakespeare_char', f"--input={shared_file('tinyshakespeare.txt')}", f'--out_dir={out}'])
    return out
