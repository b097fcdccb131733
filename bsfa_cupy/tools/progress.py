"""Progress bars through tqdm when it is installed (a bare GPU image may lack it)."""


def progress(iterable, desc: str, enabled: bool = True):
    if enabled:
        try:
            from tqdm import tqdm
        except ImportError:
            return iterable
        return tqdm(iterable, desc=desc, leave=False)
    return iterable
