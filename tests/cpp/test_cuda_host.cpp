// The CUDA kernels' bodies driven on the CPU over every block and thread of a
// launch, against the CPU path.
#include "reference.h"
#include "rtn_kernel.h"

#include <catch2/catch.hpp>

using namespace normtweak;
using namespace normtweak::test;

TEST_CASE("RTN kernel body reproduces Quantizer<RTN> over a whole launch", "[cuda][host]") {
  const int m = 37, n = 256;  // rows not a multiple of anything: exercises the grid-stride tail
  const MatF W = realistic_weights(m, n, 3);
  for (int gs : {-1, 64}) {
    QuantSpec spec;
    spec.bits = 3;
    spec.group_size = gs;
    const QuantResult ref = Quantizer<RTN>(spec).quantize(TensorView::of(W.data(), {m, n}));
    RowMatrix<float> Q(m, n);
    RowMatrix<std::uint8_t> codes(m, n);
    cuda::RtnParams p{W.data(), Q.data(), codes.data(), ref.scales.data(), ref.zeros.data(), ref.g_idx.data(),
                      m, n, n, static_cast<std::int32_t>(ref.scales.cols()), spec.maxq()};
    // A deliberately small grid so each thread strides over several elements.
    const std::int64_t grid = 7;
    for (std::int64_t b = 0; b < grid; ++b)
      for (std::int64_t t = 0; t < cuda::kRtnBlock; ++t) cuda::rtn_thread(p, b, t, cuda::kRtnBlock, grid);
    CHECK(Q == ref.Q);
    CHECK(codes == ref.codes);
    CHECK(cuda::rtn_grid(p) == (m * n + 255) / 256);
  }
}
