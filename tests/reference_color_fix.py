"""The published colour-fix formulas (chain_of_zoom.md) written again in NumPy, float64, for tests."""
import numpy as np

KERNEL = np.array([[1, 2, 1], [2, 4, 2], [1, 2, 1]], dtype=np.float64) / 16


def np_blur(img, d):
    """img: H,W,C. 3x3 binomial taps at distance d, edge (replicate) padding."""
    p = np.pad(img, ((d, d), (d, d), (0, 0)), mode="edge")
    h, w = img.shape[:2]
    out = np.zeros_like(img)
    for i in range(3):
        for j in range(3):
            out += KERNEL[i, j] * p[i * d : i * d + h, j * d : j * d + w]
    return out


def np_wavelet(content, ref):
    """Content's high frequencies + the reference's low frequencies (5 levels), clipped to 0..1."""
    def decompose(x):
        high = np.zeros_like(x)
        for level in range(5):
            low = np_blur(x, 2**level)
            high += x - low
            x = low
        return high, x

    return np.clip(decompose(content)[0] + decompose(ref)[1], 0, 1)


def np_adain(content, ref):
    """Per-channel mean/std matched to the reference (unbiased variance, eps 1e-5), clipped to 0..1."""
    def stats(x):
        flat = x.reshape(-1, x.shape[-1])
        return flat.mean(0), np.sqrt(flat.var(0, ddof=1) + 1e-5)

    cm, cs = stats(content)
    rm, rs = stats(ref)
    return np.clip((content - cm) / cs * rs + rm, 0, 1)
