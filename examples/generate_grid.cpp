// Loads a trained model and writes a grid of 16 class-conditional samples: the library's generation
// pipeline without the CLI (docs/library.md). usage: generate_grid RUN_FOLDER OUT.png
#include <iostream>

#include "diffuse/io/image_io.h"
#include "diffuse/sample/pipeline.h"

int main(int argc, char** argv) {
  if (argc != 3) {
    std::cerr << "usage: generate_grid RUN_FOLDER OUT.png\n";
    return 2;
  }
  try {
    auto run = diffuse::load_run(argv[1]);  // EMA weights, scheduler config, the VAE of a latent run
    diffuse::GenerateOptions g;
    g.sampler = "dpmpp_2m";
    g.steps = 20;
    g.n = 16;
    if (run.class_embeds > 0) g.cfg = 3.0;  // classifier-free guidance for a class-conditional model
    g.progress = [](const diffuse::GenerateProgress& p) { std::cerr << "\rstep " << p.done << "/" << p.total; };
    auto out = diffuse::generate(run, g);
    diffuse::write_grid_png(argv[2], out.images, {});
    std::cerr << "\nwrote " << argv[2] << " (" << out.seconds << " s)\n";
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
}
