/* The smallest app: print and exit with a chosen status. */
#include <stdio.h>
#include <stdlib.h>
int main(int argc, char **argv) {
    printf("hello from a picoprocess: argc=%d argv0=%s\n", argc, argv[0]);
    return argc > 1 ? atoi(argv[1]) : 0;
}
