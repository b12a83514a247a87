/* A dynamically linked C workload: heavy malloc/free, stdio, files, and qsort over a few
 * MB. Prints a deterministic summary that the test compares with a native run. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static uint64_t state = 0x9e3779b97f4a7c15ull;
static uint64_t next(void) { state ^= state << 13; state ^= state >> 7; state ^= state << 17; return state; }
static int cmp(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

int main(int argc, char **argv) {
    const char *path = argc > 1 ? argv[1] : "/tmp/workload.txt";
    /* malloc/free churn of many sizes, including mmap-sized blocks and realloc growth. */
    uint64_t sum = 0;
    void *slots[512] = {0};
    for (int i = 0; i < 200000; i++) {
        int k = next() % 512;
        free(slots[k]);
        size_t size = (next() % 16 == 0) ? 200000 + next() % 300000 : 1 + next() % 2000;
        slots[k] = malloc(size);
        memset(slots[k], (int)(size & 0xff), size < 64 ? size : 64);
        sum += ((unsigned char *)slots[k])[0];
    }
    char *grow = NULL;
    for (size_t n = 1; n <= (1u << 22); n *= 2) {
        grow = realloc(grow, n);
        grow[n - 1] = (char)n;
    }
    free(grow);
    for (int k = 0; k < 512; k++) free(slots[k]);

    /* qsort over 4 MB. */
    size_t count = 512 * 1024;
    uint64_t *values = malloc(count * sizeof *values);
    for (size_t i = 0; i < count; i++) values[i] = next();
    qsort(values, count, sizeof *values, cmp);
    int sorted = 1;
    for (size_t i = 1; i < count; i++) sorted &= values[i - 1] <= values[i];
    uint64_t median = values[count / 2];
    free(values);

    /* stdio through a file. */
    FILE *f = fopen(path, "w");
    if (!f) { perror("fopen for writing"); return 2; }
    for (int i = 0; i < 10000; i++) fprintf(f, "line %d %llu\n", i, (unsigned long long)(i * 2654435761u));
    fclose(f);
    f = fopen(path, "r");
    if (!f) { perror("fopen for reading"); return 3; }
    char line[128];
    unsigned long lines = 0, chars = 0;
    while (fgets(line, sizeof line, f)) { lines++; chars += strlen(line); }
    fclose(f);
    if (remove(path) != 0) { perror("remove"); return 4; }

    printf("sum=%llu sorted=%d median=%llu lines=%lu chars=%lu\n",
           (unsigned long long)sum, sorted, (unsigned long long)median, lines, chars);
    return sorted ? 0 : 1;
}
