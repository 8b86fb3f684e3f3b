"""Head dims above 256 (configs.CHUNKED_FROM): products over the head dim taken in chunks loaded in a loop, so no
operand of the full head dim is held in registers or shared memory (see configs.py for the tile budget)."""
import triton
import triton.language as tl


@triton.jit
def chunked_dot(a_rows, a_ok, stride_ad, b_rows, b_ok, stride_bd, dim, DIM: tl.constexpr, K_CHUNK: tl.constexpr,
                DOT_PRECISION: tl.constexpr):
    """(A, B) rows (pointers to element 0 of each row, (ROWS_A,), (ROWS_B,)) -> A @ B^T over their first dim
    elements (DIM: dim rounded up to K_CHUNK), fp32 (ROWS_A, ROWS_B); rows not ok read as 0."""
    acc = tl.zeros([a_rows.shape[0], b_rows.shape[0]], tl.float32)
    for c in tl.range(0, DIM, K_CHUNK):
        offs = c + tl.arange(0, K_CHUNK)
        a = tl.load(a_rows[:, None] + offs[None, :] * stride_ad, mask=a_ok[:, None] & (offs[None, :] < dim),
                    other=0.0)
        b = tl.load(b_rows[:, None] + offs[None, :] * stride_bd, mask=b_ok[:, None] & (offs[None, :] < dim),
                    other=0.0)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def load_chunk(rows, ok, stride_d, offs, dim):
    """Columns offs (< dim) of rows (pointers to element 0 of each row), 0 elsewhere."""
    return tl.load(rows[:, None] + offs[None, :] * stride_d, mask=ok[:, None] & (offs[None, :] < dim), other=0.0)
