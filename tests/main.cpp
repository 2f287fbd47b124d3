#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <iostream>

#include "twins/runtime.h"

// The tests run with the CPU convolutions a training run uses: on a LibTorch whose oneDNN
// convolutions are wrong, with oneDNN turned off, as the Trainer does.
int main(int argc, char** argv) {
  if (const std::string& note = twins::ensure_correct_cpu_convolutions(); !note.empty())
    std::cerr << "note: " << note << "\n";
  doctest::Context context(argc, argv);
  return context.run();
}
