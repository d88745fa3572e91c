// A libFuzzer-compatible driver for compilers without -fsanitize=fuzzer (GCC):
// seeded random inputs of random length for a bounded number of seconds.
//   fuzz_import [seconds=10] [seed=1]
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size);

int main(int argc, char** argv) {
  const double seconds = argc > 1 ? std::atof(argv[1]) : 10.0;
  const unsigned seed = argc > 2 ? static_cast<unsigned>(std::atoi(argv[2])) : 1u;
  std::mt19937 rng(seed);
  const auto t0 = std::chrono::steady_clock::now();
  long runs = 0;
  std::vector<std::uint8_t> buf;
  while (std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() < seconds) {
    buf.resize(rng() % 4096);
    for (auto& b : buf) b = static_cast<std::uint8_t>(rng());
    LLVMFuzzerTestOneInput(buf.data(), buf.size());
    ++runs;
  }
  std::printf("fuzz_import: %ld inputs in %.0f s (seed %u), no crash\n", runs, seconds, seed);
  return 0;
}
