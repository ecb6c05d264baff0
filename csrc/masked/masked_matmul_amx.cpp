// AMX and AVX512-BF16 masked matmuls for bfloat16 on the shared panel driver (common/amx_bf16.h):
// each stored 16x16 tile of a panel is one B tile, rearranged once per call into the pair layout
// in the L1 of the thread that uses it; two stored tiles at k-tiles 2u and 2u + 1 make one K = 32
// step (every step of a weight with no zero tiles; at 75% zero tiles about one stored tile in four
// has its partner).
#include "common/amx_bf16.h"
#include "masked/masked_matmul.h"

namespace pyhwp {

namespace {

static_assert(MaskedCpuConfig::kTileN == 16 && MaskedCpuConfig::kTileK == 16,
              "a stored tile is one 16 x 16 block of the tile unit");

struct MaskedPanels {
  const MaskedMatrixBf16& w;

  // Contiguous runs of panels balanced by their tiles, plus 4 per panel for its stores (a tile
  // costs one product per 16 columns, a panel's store a conversion per column; with 1 instead of
  // 4, 1536x384 at batch 128, 75% zero tiles, measured ~10% slower).
  void runs(int nt, std::vector<int64_t>* r) const { balanced_runs(w.tile_ptr, (w.rows + 15) / 16, 4, nt, r); }

  int64_t capacity(int64_t first, int64_t last) const {
    int64_t most = 0;
    for (int64_t j = first; j < last; ++j) most = std::max(most, w.tile_ptr[j + 1] - w.tile_ptr[j]);
    return most * amx::kTile;
  }

  // The stored tiles (k-major: (k, n) at 16 k + n) in B's pair layout ((k, n) at 32 (k / 2) + 2 n
  // + k % 2): rows 2i and 2i + 1 are one 64-byte line, interleaved by one permute.
  int64_t prepare(int64_t j, uint16_t* b, amx::Step* steps) const {
    const __m512i perm = _mm512_load_si512(amx::kPairInterleave);
    const int64_t t0 = w.tile_ptr[j], count = w.tile_ptr[j + 1] - t0;
    const uint16_t* tiles = w.values + t0 * amx::kTile;
    for (int64_t i = 0; i < count * (amx::kTile / 32); ++i) {
      _mm512_store_si512(b + 32 * i, _mm512_permutexvar_epi16(perm, _mm512_loadu_si512(tiles + 32 * i)));
    }
    const int32_t* tidx = w.tile_idx + t0;
    int64_t n = 0;
    for (int64_t s = 0; s < count; ++n) {
      const int32_t t = tidx[s];
      const bool pair = t % 2 == 0 && s + 1 < count && tidx[s + 1] == t + 1;
      steps[n] = {t, pair};
      s += 1 + pair;
    }
    return n;
  }

  const char* weights(int64_t j, int64_t* lines) const {
    *lines = (w.tile_ptr[j + 1] - w.tile_ptr[j]) * amx::kTile * 2 / 64;
    return reinterpret_cast<const char*>(w.values + w.tile_ptr[j] * amx::kTile);
  }

  // Stored tiles multiply every x in their 16 columns (0 * Inf = NaN as in dense); skipped tiles
  // are what propagate_nonfinite makes up for.
  void fix_nonfinite(const DenseInBf16& x, const DenseOutBf16& y) const {
    propagate_nonfinite(x, y, [&](int64_t n, const unsigned char* flags) { return masked_stored_flags(w, n, flags); });
  }
};

template <typename Unit>
void run_panels(const Unit& unit, const MaskedMatrixBf16& w, const DenseInBf16& x, const uint16_t* bias,
                const DenseOutBf16& y, int num_threads) {
  const int nt = w.ntiles * MaskedCpuConfig::kTileSize * x.cols < MaskedCpuConfig::kSerialWork ? 1 : num_threads;
  amx::run(unit, MaskedPanels{w}, x, bias, y, nt);
}

}  // namespace

void masked_matmul_bf16_amx(const MaskedMatrixBf16& w, const DenseInBf16& x, const uint16_t* bias,
                            const DenseOutBf16& y, int num_threads) {
  run_panels(amx::TileUnit{}, w, x, bias, y, num_threads);
}

void masked_matmul_bf16_dot(const MaskedMatrixBf16& w, const DenseInBf16& x, const uint16_t* bias,
                            const DenseOutBf16& y, int num_threads) {
  run_panels(amx::DotUnit{}, w, x, bias, y, num_threads);
}

}  // namespace pyhwp
