/* A tiny check harness for guest programs: CHECK prints what failed and counts it. */
#include <errno.h>
#include <stdio.h>
#include <string.h>
static int failures;
#define CHECK(cond) do { if (!(cond)) { failures++; \
    printf("FAIL %s:%d: %s (errno=%d %s)\n", __FILE__, __LINE__, #cond, errno, strerror(errno)); } } while (0)
#define DONE() do { printf("%s: %d failures\n", failures ? "FAILED" : "PASSED", failures); \
    return failures ? 1 : 0; } while (0)
