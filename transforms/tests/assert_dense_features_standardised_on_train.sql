-- Normalisation rule: dense features are z-scored with train statistics, so over the train
-- rows of fct_ctr_samples each has mean 0 and population standard deviation 1 (or is all 0
-- when the train deviation is 0). Returns the offending features (none = pass).

with

train_rows as (

    select dense_user_activity, dense_item_popularity, dense_item_age
    from {{ ref('fct_ctr_samples') }}
    where split = 'train'

),

moments as (

    select 'dense_user_activity' as feature, avg(dense_user_activity) as mean, stddev_pop(dense_user_activity) as std
    from train_rows
    union all
    select 'dense_item_popularity' as feature, avg(dense_item_popularity) as mean, stddev_pop(dense_item_popularity) as std
    from train_rows
    union all
    select 'dense_item_age' as feature, avg(dense_item_age) as mean, stddev_pop(dense_item_age) as std
    from train_rows

)

select *
from moments
where abs(mean) > 1e-6
   or (abs(std - 1) > 1e-6 and abs(std) > 1e-6)
