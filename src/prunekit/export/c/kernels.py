"""The C99 kernels the generated ``model.c`` is made of (only the ones a model uses are emitted).

Integer only: int8 activations and weights, int32 accumulators, one int64 product per output for the
requantization (``pk_rshift``, the rounding shift of :mod:`prunekit.quant.rounding`). No dynamic
allocation, no library calls. Convolutions loop output channel -> stored weight -> output pixels, so a
sparse row visits only its kept weights and each weight's valid output window is computed once
(``pk_span``) instead of testing padding per pixel.
"""

COMMON = r"""
static int64_t pk_floor_shift(int64_t y, int32_t sh)
{
    /* floor(y / 2^sh), written out: >> of a negative value is implementation-defined */
    return y >= 0 ? (y >> sh) : -((-(y + 1)) >> sh) - 1;
}

static int64_t pk_rshift(int64_t y, int32_t sh)
{
    /* y / 2^sh rounded half to even (sh >= 1): prunekit.quant.rounding.rshift_round */
    return pk_floor_shift(y + ((int64_t)1 << (sh - 1)) - 1 + (pk_floor_shift(y, sh) & 1), sh);
}

static int32_t pk_clamp(int64_t v, int32_t lo, int32_t hi)
{
    return v < lo ? lo : (v > hi ? hi : (int32_t)v);
}
"""

CONV = r"""
typedef struct {
    uint16_t cin, h, w, cout, oh, ow, kh, kw, sy, sx, py, px, dy, dx, groups;
    uint8_t fmt, ptr32, wide; /* fmt 0 dense, 1 csr8 (8-bit column deltas), 2 csr16 */
    int32_t lo, hi;
    const int8_t *val;
    const void *idx;
    const void *ptr;
    const int32_t *mult;
    const int8_t *shift;
    const int64_t *bias; /* bias_q * mult: (acc + bias_q) * mult = acc * mult + bias */
} pk_conv_t;

/* output positions o in [a, b) whose input position o * s + off lies in [0, n_in) */
static void pk_span(int32_t off, int32_t s, int32_t n_in, int32_t n_out, int32_t *a, int32_t *b)
{
    int32_t lo = off < 0 ? (-off + s - 1) / s : 0, hi;
    if (n_in - 1 - off < 0) {
        *a = 0;
        *b = 0;
        return;
    }
    hi = (n_in - 1 - off) / s + 1;
    if (hi > n_out) hi = n_out;
    *a = lo;
    *b = hi < lo ? lo : hi;
}

static void pk_tap(const int8_t *x, int32_t *acc, const pk_conv_t *L, int32_t t, int32_t v)
{
    const int32_t kk = (int32_t)L->kh * L->kw, ci = t / kk, r = t % kk;
    const int32_t offy = (r / L->kw) * L->dy - L->py, offx = (r % L->kw) * L->dx - L->px;
    const int8_t *xc = x + ci * (int32_t)L->h * L->w;
    int32_t y0, y1, x0, x1, oy, ox;
    pk_span(offy, L->sy, L->h, L->oh, &y0, &y1);
    pk_span(offx, L->sx, L->w, L->ow, &x0, &x1);
    for (oy = y0; oy < y1; ++oy) {
        const int8_t *xr = xc + (oy * L->sy + offy) * (int32_t)L->w;
        int32_t *ar = acc + oy * (int32_t)L->ow;
        for (ox = x0; ox < x1; ++ox) ar[ox] += v * xr[ox * L->sx + offx];
    }
}

static void pk_conv(const int8_t *x, void *out, int32_t *acc, const pk_conv_t *L)
{
    const int32_t cpg = L->cin / L->groups, opg = L->cout / L->groups;
    const int32_t k = cpg * L->kh * L->kw, np = (int32_t)L->oh * L->ow;
    int32_t o, p, j;
    for (o = 0; o < L->cout; ++o) {
        const int8_t *xg = x + (o / opg) * cpg * (int32_t)L->h * L->w;
        for (p = 0; p < np; ++p) acc[p] = 0;
        if (L->fmt == 0) {
            const int8_t *wr = L->val + o * k;
            for (j = 0; j < k; ++j)
                if (wr[j]) pk_tap(xg, acc, L, j, wr[j]);
        } else {
            const int32_t a = L->ptr32 ? (int32_t)((const uint32_t *)L->ptr)[o]
                                       : ((const uint16_t *)L->ptr)[o];
            const int32_t b = L->ptr32 ? (int32_t)((const uint32_t *)L->ptr)[o + 1]
                                       : ((const uint16_t *)L->ptr)[o + 1];
            int32_t t = 0;
            for (j = a; j < b; ++j) {
                t = L->fmt == 1 ? t + ((const uint8_t *)L->idx)[j] : ((const uint16_t *)L->idx)[j];
                if (L->val[j]) pk_tap(xg, acc, L, t, L->val[j]);
            }
        }
        for (p = 0; p < np; ++p) {
            const int64_t y = (int64_t)acc[p] * L->mult[o] + L->bias[o];
            const int32_t q = pk_clamp(pk_rshift(y, L->shift[o]), L->lo, L->hi);
            if (L->wide)
                ((int32_t *)out)[o * np + p] = q;
            else
                ((int8_t *)out)[o * np + p] = (int8_t)q;
        }
    }
}
"""

ADD = r"""
typedef struct {
    int32_t n, ma, mb, shift, lo, hi;
} pk_add_t;

static void pk_add(const int8_t *a, const int8_t *b, int8_t *y, const pk_add_t *L)
{
    int32_t i;
    for (i = 0; i < L->n; ++i) {
        const int64_t v = (int64_t)a[i] * L->ma + (int64_t)b[i] * L->mb;
        y[i] = (int8_t)pk_clamp(pk_rshift(v, L->shift), L->lo, L->hi);
    }
}
"""

REQUANT = r"""
typedef struct {
    int32_t n, m, shift, lo, hi;
} pk_requant_t;

static void pk_requant(const int8_t *x, int8_t *y, const pk_requant_t *L)
{
    int32_t i;
    for (i = 0; i < L->n; ++i)
        y[i] = (int8_t)pk_clamp(pk_rshift((int64_t)x[i] * L->m, L->shift), L->lo, L->hi);
}
"""

LUT = r"""
static void pk_lut(const int8_t *x, int8_t *y, int32_t n, const int8_t *table)
{
    int32_t i;
    for (i = 0; i < n; ++i) y[i] = table[x[i] + 128];
}
"""

POOL = r"""
typedef struct {
    uint16_t c, h, w, oh, ow, kh, kw, sy, sx, py, px;
    uint8_t avg; /* 1: sum (average, padding counts as zeros), 0: maximum */
    int32_t m, shift, lo, hi;
} pk_pool_t;

static void pk_pool(const int8_t *x, int8_t *y, const pk_pool_t *L)
{
    int32_t c, oy, ox, ky, kx;
    for (c = 0; c < L->c; ++c) {
        const int8_t *xc = x + c * (int32_t)L->h * L->w;
        for (oy = 0; oy < L->oh; ++oy) {
            for (ox = 0; ox < L->ow; ++ox) {
                int32_t v = L->avg ? 0 : -128;
                for (ky = 0; ky < L->kh; ++ky) {
                    const int32_t iy = oy * L->sy + ky - L->py;
                    if (iy < 0 || iy >= L->h) continue;
                    for (kx = 0; kx < L->kw; ++kx) {
                        const int32_t ix = ox * L->sx + kx - L->px;
                        if (ix < 0 || ix >= L->w) continue;
                        if (L->avg)
                            v += xc[iy * L->w + ix];
                        else if (xc[iy * L->w + ix] > v)
                            v = xc[iy * L->w + ix];
                    }
                }
                *y++ = (int8_t)pk_clamp(pk_rshift((int64_t)v * L->m, L->shift), L->lo, L->hi);
            }
        }
    }
}
"""

WIDEN = r"""
static void pk_widen(const int8_t *x, int32_t *y, int32_t n)
{
    int32_t i;
    for (i = 0; i < n; ++i) y[i] = (int32_t)x[i] * 65536;
}
"""

KERNELS = {
    "conv": CONV,
    "add": ADD,
    "requant": REQUANT,
    "lut": LUT,
    "maxpool": POOL,
    "avgpool": POOL,
    "widen": WIDEN,
}
