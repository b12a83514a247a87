/* hello: the smallest image. A static program that greets and exits 0. */
#include <stdio.h>

int main(int argc, char **argv) {
    const char *who = argc > 1 ? argv[1] : "picocenter";
    printf("hello from %s, in an image\n", who);
    return 0;
}
