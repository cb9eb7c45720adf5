// Backend-neutral helpers for the shared kernel bodies, written only with KX_* macros and plain C++ that
// Metal, CUDA and the CPU emulation all accept (no std::, no double, no backend intrinsics).

// "No score yet": a finite sentinel instead of -inf, so the online softmax never relies on IEEE infinities
// (Metal's fast math mode does not guarantee them) and exp(KX_NEG_BIG - m) is simply 0.
#define KX_NEG_BIG (-3.0e38f)

KX_FN int kx_imin(int a, int b) { return a < b ? a : b; }
KX_FN int kx_imax(int a, int b) { return a > b ? a : b; }
KX_FN float kx_fmax(float a, float b) { return a > b ? a : b; }

// The mask rule of gemma_mlx/model/masks.py, for one (query, key) pair over absolute positions:
// valid(k) AND (k <= q OR same_block) AND (k > q - W OR (same_block AND override)); W <= 0 means no window.
KX_FN bool kx_visible(int qp, int kp, int qb, int kb, int window, int override_window) {
  const bool same = qb >= 0 && qb == kb;
  const bool causal = kp <= qp || same;
  const bool in_window = window <= 0 || kp > qp - window || (same && override_window != 0);
  return kp >= 0 && causal && in_window;
}

// Could key position kp be visible to any query in [q_lo, q_hi]? Conservative (never false for a visible key),
// so a tile where it is false for every key can be skipped whole: this is what bounds a sliding layer's work to
// its window and a causal chunk's work to the keys at or before its last query.
KX_FN bool kx_may_see(int kp, int q_lo, int q_hi, int window, bool blocks, int override_window) {
  if (kp < 0) return false;
  const bool in_window = window <= 0 || kp > q_lo - window;
  if (blocks) return in_window || override_window != 0;  // a block can reach later keys, and past the window
  return kp <= q_hi && in_window;
}
