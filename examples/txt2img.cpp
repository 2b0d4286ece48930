// Text to image with a Stable Diffusion 1.x / 2.x pipeline folder (diffusers' layout): the library's path without
// the CLI (docs/library.md). usage: txt2img PIPELINE_FOLDER "PROMPT" OUT.png [NEGATIVE_PROMPT]
#include <iostream>

#include "diffuse/io/image_io.h"
#include "diffuse/sample/pipeline.h"

int main(int argc, char** argv) {
  if (argc != 4 && argc != 5) {
    std::cerr << "usage: txt2img PIPELINE_FOLDER \"PROMPT\" OUT.png [NEGATIVE_PROMPT]\n";
    return 2;
  }
  try {
    auto run = diffuse::load_run(argv[1]);  // unet/, text_encoder/, tokenizer/, vae/, scheduler/
    diffuse::GenerateOptions g;
    g.prompts = {argv[2]};
    if (argc == 5) g.negative_prompts = {argv[4]};
    g.steps = 25;                           // the sampler the pipeline's scheduler config names
    g.n = 1;
    g.cfg = 7.5;
    g.cfg_rescale = 0.7;                    // Lin et al. 2023's phi
    g.progress = [](const diffuse::GenerateProgress& p) { std::cerr << "\rstep " << p.done << "/" << p.total; };
    auto out = diffuse::generate(run, g);
    for (const auto& note : out.notes) std::cerr << "\nnote: " << note;
    diffuse::write_png(argv[3], out.images[0]);
    std::cerr << "\nwrote " << argv[3] << " (" << out.seconds << " s)\n";
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
}
