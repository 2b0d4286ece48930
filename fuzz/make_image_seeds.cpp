#define STB_IMAGE_WRITE_IMPLEMENTATION
#include <stb/stb_image_write.h>
#include <vector>
#include <string>
int main() {
  for (int c : {1, 2, 3, 4}) {
    int w = 5, h = 3;
    std::vector<unsigned char> px(w * h * c);
    for (size_t i = 0; i < px.size(); ++i) px[i] = (unsigned char)(i * 37 + c);
    std::string s = std::to_string(c);
    stbi_write_png(("c" + s + ".png").c_str(), w, h, c, px.data(), w * c);
    stbi_write_bmp(("c" + s + ".bmp").c_str(), w, h, c, px.data());
    stbi_write_jpg(("c" + s + ".jpg").c_str(), w, h, c, px.data(), 80);
    stbi_write_tga(("c" + s + ".tga").c_str(), w, h, c, px.data());
  }
}
